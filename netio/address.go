package netio

import (
	"bytes"
	"net/netip"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// mbKind classifies a parsed path.
type mbKind uint8

const (
	mbOK         mbKind = iota // an ASCII mailbox local@domain
	mbUTF8                     // a mailbox with non-ASCII octets (needs SMTPUTF8)
	mbNull                     // the null path <>
	mbPostmaster               // <postmaster> without a domain
	mbLiteral                  // domain is an address literal [1.2.3.4]
	mbBad                      // malformed
)

// parseMailbox parses the text inside the angle brackets of a MAIL or RCPT
// path (RFC 5321 §4.1.2; RFC 6531 for UTF-8). A source route (@a,@b:) is
// accepted and dropped as §4.1.1.3 requires. It returns the mailbox as
// local@domain.
func parseMailbox(path []byte, mail bool) (string, mbKind) {
	if len(path) == 0 {
		return "", mbNull
	}
	if path[0] == '@' {
		i := bytes.IndexByte(path, ':')
		if i < 0 {
			return "", mbBad
		}
		for _, hop := range bytes.Split(path[:i], []byte(",")) {
			if len(hop) < 2 || hop[0] != '@' || !validDomain(hop[1:]) {
				return "", mbBad
			}
		}
		path = path[i+1:]
	}
	if !mail && len(path) == len("postmaster") && strings.EqualFold(string(path), "postmaster") {
		return "postmaster", mbPostmaster
	}
	local, domain, ok := splitMailbox(path)
	if !ok || len(local) == 0 || len(domain) == 0 || len(domain) > maxDomain {
		return "", mbBad
	}
	utf := false
	if local[0] == '"' {
		if !validQuoted(local) {
			return "", mbBad
		}
	} else if !validDotString(local) {
		return "", mbBad
	}
	kind := mbOK
	if domain[0] == '[' {
		if !validLiteral(domain) {
			return "", mbBad
		}
		kind = mbLiteral
	} else if !validDomain(domain) {
		return "", mbBad
	}
	for _, c := range path {
		if c >= 0x80 {
			utf = true
			break
		}
	}
	if utf {
		if !utf8.Valid(path) {
			return "", mbBad
		}
		if kind == mbOK && !validIDN(domain) {
			return "", mbBad
		}
		if kind == mbOK {
			kind = mbUTF8
		}
	}
	if kind == mbLiteral && mail {
		kind = mbOK
	}
	return string(path), kind
}

// splitMailbox splits at the '@' that follows the local part (which may be
// a quoted string containing '@').
func splitMailbox(b []byte) (local, domain []byte, ok bool) {
	if len(b) > 0 && b[0] == '"' {
		for i := 1; i < len(b); i++ {
			switch b[i] {
			case '\\':
				i++
			case '"':
				if i+1 < len(b) && b[i+1] == '@' {
					return b[:i+1], b[i+2:], true
				}
				return nil, nil, false
			}
		}
		return nil, nil, false
	}
	i := bytes.LastIndexByte(b, '@')
	if i < 0 {
		return nil, nil, false
	}
	return b[:i], b[i+1:], true
}

// atext of RFC 5322 §3.2.3, plus octets >= 0x80 (RFC 6531 UTF-8).
func isAtext(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c >= 0x80:
		return true
	}
	return strings.IndexByte("!#$%&'*+-/=?^_`{|}~", c) >= 0
}

func validDotString(b []byte) bool {
	if b[0] == '.' || b[len(b)-1] == '.' {
		return false
	}
	prevDot := false
	for _, c := range b {
		if c == '.' {
			if prevDot {
				return false
			}
			prevDot = true
			continue
		}
		prevDot = false
		if !isAtext(c) {
			return false
		}
	}
	return true
}

func validQuoted(b []byte) bool {
	if len(b) < 2 || b[0] != '"' || b[len(b)-1] != '"' {
		return false
	}
	for i := 1; i < len(b)-1; i++ {
		c := b[i]
		switch {
		case c == '\\':
			i++
			if i >= len(b)-1 || b[i] < 32 || b[i] == 127 {
				return false
			}
		case c == '"' || c < 32 || c == 127:
			return false
		}
	}
	return true
}

// validDomain checks an RFC 5321 Domain: dot-separated labels of letters,
// digits and hyphens (or UTF-8 octets for U-labels), 1–63 octets each, not
// starting or ending with a hyphen.
func validDomain(b []byte) bool {
	if len(b) == 0 || len(b) > maxDomain {
		return false
	}
	for len(b) > 0 {
		label := b
		if i := bytes.IndexByte(b, '.'); i >= 0 {
			label, b = b[:i], b[i+1:]
			if len(b) == 0 {
				return false // trailing dot
			}
		} else {
			b = nil
		}
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c >= 0x80
			if !ok {
				return false
			}
		}
	}
	return true
}

// validLiteral checks an address literal: [IPv4] or [IPv6:addr].
func validLiteral(b []byte) bool {
	if len(b) < 3 || b[0] != '[' || b[len(b)-1] != ']' {
		return false
	}
	inner := string(b[1 : len(b)-1])
	if v6, ok := strings.CutPrefix(inner, "IPv6:"); ok {
		a, err := netip.ParseAddr(v6)
		return err == nil && a.Is6() && a.Zone() == ""
	}
	a, err := netip.ParseAddr(inner)
	return err == nil && a.Is4()
}

// Domain returns the domain part of a mailbox produced by the session in
// its canonical form (see CanonicalDomain), "" when there is none. It is
// the routing key: relay checks, DNS lookups and per-destination queues
// use it, so <u@bücher.example> and <u@XN--BCHER-KVA.example> go to the
// same place.
func Domain(mailbox string) string {
	i := strings.LastIndexByte(mailbox, '@')
	if i < 0 {
		return ""
	}
	return CanonicalDomain(mailbox[i+1:])
}

// CanonicalDomain returns a domain name lower-cased and, when it has
// U-labels, in its A-label (Punycode) form under IDNA2008's lookup rules
// (RFC 5890, RFC 6531 §3.2): the form the DNS knows. A name that is not a
// valid internationalised domain name is only lower-cased (the session
// refuses such names in addresses).
func CanonicalDomain(d string) string {
	for i := 0; i < len(d); i++ {
		if d[i] >= 0x80 {
			if a, err := idna.Lookup.ToASCII(d); err == nil {
				return strings.ToLower(a)
			}
			return strings.ToLower(d)
		}
	}
	return strings.ToLower(d)
}

// validIDN reports whether a domain with non-ASCII octets is a valid
// internationalised domain name.
func validIDN(d []byte) bool {
	_, err := idna.Lookup.ToASCII(string(d))
	return err == nil
}
