package dnscache

import (
	"errors"
	"strings"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Kind classifies a lookup failure.
type Kind uint8

// Kinds of lookup failure. The first four are permanent, the rest temporary.
const (
	// KindNXDomain: the name does not exist (RCODE NXDOMAIN).
	KindNXDomain Kind = iota + 1
	// KindNoData: the name exists but has no records of the type asked.
	KindNoData
	// KindInvalidName: the name is not a valid host name; it was not queried.
	KindInvalidName
	// KindNoAddress: no MX host of the domain has an address, and every
	// host's lookup failed permanently.
	KindNoAddress
	// KindServFail: every resolver answered SERVFAIL (or failed otherwise,
	// the last answer being SERVFAIL).
	KindServFail
	// KindRefused: the last resolver tried refused the query.
	KindRefused
	// KindTimeout: the last resolver tried did not answer in time.
	KindTimeout
	// KindNetwork: the last resolver tried could not be reached.
	KindNetwork
	// KindBadResponse: the last reply was malformed or unexpected (wrong
	// question, other RCODE, CNAME loop).
	KindBadResponse
	// KindCanceled: the caller's context ended, or the cache was closed.
	KindCanceled

	numKinds = int(KindCanceled) + 1
)

var kindNames = [numKinds]string{
	"unknown", "nxdomain", "nodata", "invalid_name", "no_address",
	"servfail", "refused", "timeout", "network", "bad_response", "canceled",
}

// String returns the kind's metric label, e.g. "nxdomain".
func (k Kind) String() string {
	if int(k) < numKinds {
		return kindNames[k]
	}
	return "unknown"
}

// Permanent reports whether the kind is a definitive answer about the name
// (mail bounces) rather than a transient failure (mail is deferred).
func (k Kind) Permanent() bool {
	return k == KindNXDomain || k == KindNoData || k == KindInvalidName || k == KindNoAddress
}

// Sentinel errors; errors.Is(err, ErrX) holds for every *Error of the
// corresponding kind.
var (
	ErrNXDomain    = errors.New("no such domain")
	ErrNoData      = errors.New("no records of that type")
	ErrInvalidName = errors.New("invalid domain name")
	ErrNoAddress   = errors.New("no mail host has an address")
	ErrServFail    = errors.New("server failure")
	ErrRefused     = errors.New("query refused")
	ErrTimeout     = errors.New("timed out")
	ErrNetwork     = errors.New("network error")
	ErrBadResponse = errors.New("bad response")
	ErrCanceled    = errors.New("lookup canceled")
	// ErrClosed is the cause of KindCanceled errors from a closed Cache.
	ErrClosed = errors.New("dnscache: cache closed")
)

var kindSentinels = [numKinds]error{
	nil, ErrNXDomain, ErrNoData, ErrInvalidName, ErrNoAddress,
	ErrServFail, ErrRefused, ErrTimeout, ErrNetwork, ErrBadResponse, ErrCanceled,
}

// Error is the error of every failed lookup. Errors stored in the cache
// (negative answers) are shared between callers and must not be modified.
type Error struct {
	// Kind says what went wrong.
	Kind Kind
	// Name is the name looked up, normalised when it was valid.
	Name string
	// Type is the lookup: "MX" or "A/AAAA".
	Type string
	// Server is the resolver ("ip:port") whose answer or failure this is;
	// empty when no resolver was involved.
	Server string
	// Err is the underlying cause (a network error, the hosts' errors of
	// a KindNoAddress error, ...), or nil.
	Err error
}

// Error implements error: "dnscache: MX example.org: no such domain".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("dnscache: ")
	b.WriteString(e.Type)
	b.WriteByte(' ')
	b.WriteString(e.Name)
	b.WriteString(": ")
	if s := kindSentinels[e.Kind%Kind(numKinds)]; s != nil {
		b.WriteString(s.Error())
	} else {
		b.WriteString("unknown error")
	}
	if e.Server != "" {
		b.WriteString(" (from ")
		b.WriteString(e.Server)
		b.WriteByte(')')
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Permanent reports whether the failure is definitive: mail bounces.
func (e *Error) Permanent() bool { return e.Kind.Permanent() }

// Temporary reports whether the failure is transient: mail is deferred.
func (e *Error) Temporary() bool { return !e.Kind.Permanent() }

// Unwrap returns the kind's sentinel (ErrNXDomain, ...) and the cause.
func (e *Error) Unwrap() []error {
	s := kindSentinels[e.Kind%Kind(numKinds)]
	switch {
	case s == nil && e.Err == nil:
		return nil
	case s == nil:
		return []error{e.Err}
	case e.Err == nil:
		return []error{s}
	}
	return []error{s, e.Err}
}

// SMTP returns the SMTP reply that describes the failure to a sender:
// 550 5.1.2 for a domain that does not exist or has no mail host,
// 550 5.4.4 when no host of the domain has an address, and 451 4.4.3
// (directory server failure) for every temporary failure.
func (e *Error) SMTP() *smtperr.Error {
	switch e.Kind {
	case KindNXDomain:
		return smtperr.New(550, "5.1.2", "domain %s does not exist", e.Name)
	case KindNoData:
		return smtperr.New(550, "5.1.2", "domain %s has no mail exchanger or address", e.Name)
	case KindInvalidName:
		return smtperr.New(550, "5.1.2", "invalid domain name %q", e.Name)
	case KindNoAddress:
		return smtperr.New(550, "5.4.4", "no mail exchanger of %s has an address", e.Name)
	}
	return smtperr.New(451, "4.4.3", "temporary DNS failure for %s: %s", e.Name, e.Kind)
}

// As lets errors.As (and so smtperr.Classify) see an *Error as its SMTP
// reply, so that permanent DNS failures bounce rather than being treated
// as unknown (temporary) errors.
func (e *Error) As(target any) bool {
	if t, ok := target.(**smtperr.Error); ok {
		*t = e.SMTP()
		return true
	}
	return false
}

// IsPermanent reports whether err is (or wraps) a permanent *Error.
// Errors of any other type are temporary.
func IsPermanent(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Permanent()
}
