package netio

import (
	"bytes"
	"unicode/utf8"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Delivery status notification parameters (RFC 3461), as the server parses
// them from MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT).
//
// What is accepted, as Postfix's smtpd does: each parameter at most once
// per command; RET=FULL or HDRS; ENVID an xtext (RFC 3461 §4) of printable
// ASCII or white space once decoded, at most 100 octets on the wire
// (§4.4); NOTIFY=NEVER or a list of SUCCESS, FAILURE and DELAY (§4.1);
// ORCPT=addr-type;xtext with an atom for addr-type, at most 500 octets
// (§4.2), raw UTF-8 allowed in its address only for addr-type utf-8 in
// an SMTPUTF8 transaction (RFC 6533 §3, utf-8-addr-unitext). Anything else is refused
// with 501 5.5.4 naming the parameter; the transaction is left as it was.

// NOTIFY flags for RcptDSN.Notify. Zero means no NOTIFY parameter.
const (
	NotifyNever   uint8 = 1 << iota // NOTIFY=NEVER
	NotifySuccess                   // SUCCESS
	NotifyFailure                   // FAILURE
	NotifyDelay                     // DELAY
)

// RcptDSN holds the DSN parameters of one RCPT command.
type RcptDSN struct {
	// Notify holds the NOTIFY flags (NotifyNever, ...), 0 when absent.
	Notify uint8
	// ORcpt is the ORCPT parameter as received, "addr-type;xtext" (still
	// encoded), "" when absent.
	ORcpt string
}

// Bounds of RFC 3461 on the encoded parameter values.
const (
	maxEnvID = 100
	maxORcpt = 500
)

var (
	errDSNRet    = smtperr.New(501, "5.5.4", "Error: Bad RET parameter syntax")
	errDSNEnvID  = smtperr.New(501, "5.5.4", "Error: Bad ENVID parameter syntax")
	errDSNNotify = smtperr.New(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
	errDSNORcpt  = smtperr.New(501, "5.5.4", "Error: Bad ORCPT parameter syntax")
)

// parseRet parses a RET value into "FULL" or "HDRS".
func parseRet(val []byte) (string, bool) {
	switch {
	case eqVerb(val, "FULL"):
		return "FULL", true
	case eqVerb(val, "HDRS"):
		return "HDRS", true
	}
	return "", false
}

// parseEnvID decodes an ENVID value; the decoded identifier must be
// printable ASCII or white space (RFC 3461 §4.4) and non-empty.
func parseEnvID(val []byte) (string, bool) {
	if len(val) == 0 || len(val) > maxEnvID {
		return "", false
	}
	dec, ok := decodeXtext(val, false)
	if !ok || len(dec) == 0 {
		return "", false
	}
	for _, c := range dec {
		if (c < ' ' || c > '~') && c != '\t' {
			return "", false
		}
	}
	return string(dec), true
}

// parseNotify parses a NOTIFY value: NEVER alone, or a comma-separated list
// of SUCCESS, FAILURE and DELAY, each at most once.
func parseNotify(val []byte) (uint8, bool) {
	if eqVerb(val, "NEVER") {
		return NotifyNever, true
	}
	var flags uint8
	for len(val) > 0 {
		item, rest, _ := bytes.Cut(val, []byte(","))
		var f uint8
		switch {
		case eqVerb(item, "SUCCESS"):
			f = NotifySuccess
		case eqVerb(item, "FAILURE"):
			f = NotifyFailure
		case eqVerb(item, "DELAY"):
			f = NotifyDelay
		default:
			return 0, false
		}
		if flags&f != 0 {
			return 0, false
		}
		flags |= f
		if len(rest) == 0 && len(item) < len(val) {
			return 0, false // trailing comma
		}
		val = rest
	}
	return flags, flags != 0
}

// parseORcpt checks an ORCPT value, addr-type ";" xtext, and returns it as
// received. utf8OK admits raw UTF-8 in the address of addr-type utf-8
// (an SMTPUTF8 transaction).
func parseORcpt(val []byte, utf8OK bool) (string, bool) {
	if len(val) > maxORcpt {
		return "", false
	}
	typ, addr, ok := bytes.Cut(val, []byte(";"))
	if !ok || len(typ) == 0 || len(addr) == 0 {
		return "", false
	}
	for _, c := range typ {
		if c >= 0x80 || !isAtext(c) {
			return "", false
		}
	}
	// Raw UTF-8 is utf-8-addr-unitext, of the utf-8 type only; the
	// address of any other type is xtext, ASCII (RFC 6533 §3).
	utf8OK = utf8OK && eqVerb(typ, "UTF-8")
	if _, ok := decodeXtext(addr, utf8OK); !ok {
		return "", false
	}
	return string(val), true
}

// decodeXtext decodes xtext (RFC 3461 §4): octets from '!' to '~' other
// than '+' and '=' stand for themselves, "+HH" for the octet of hex value HH
// (upper case in the RFC; lower case is accepted as Postfix does). With
// utf8OK, valid UTF-8 sequences of non-ASCII characters are also taken as
// they are.
func decodeXtext(b []byte, utf8OK bool) ([]byte, bool) {
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); {
		c := b[i]
		switch {
		case c == '+':
			if i+2 >= len(b) {
				return nil, false
			}
			hi, ok1 := unhex(b[i+1])
			lo, ok2 := unhex(b[i+2])
			if !ok1 || !ok2 {
				return nil, false
			}
			out = append(out, hi<<4|lo)
			i += 3
		case c == '=':
			return nil, false
		case c >= '!' && c <= '~':
			out = append(out, c)
			i++
		case c >= 0x80 && utf8OK:
			r, n := utf8.DecodeRune(b[i:])
			if r == utf8.RuneError {
				return nil, false
			}
			out = append(out, b[i:i+n]...)
			i += n
		default:
			return nil, false
		}
	}
	return out, true
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}
