// Package smtperr defines the one SMTP reply/error type shared by the
// server, the engine and the outbound client.
//
// An *Error carries the three-digit reply code, the RFC 3463 enhanced status
// code and a human-readable text. Its class decides what happens to mail:
// 2xx is success, 4xx is temporary (mail is deferred and retried), 5xx is
// permanent (mail is bounced). An error that is not an *Error is of unknown
// kind and is treated as temporary: mail is deferred, never dropped.
package smtperr

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Error is an SMTP reply. It is used both as the reply a server writes and
// as the error a client reports for a remote reply.
type Error struct {
	// Code is the three-digit basic reply code (RFC 5321 §4.2), e.g. 451.
	Code int
	// Enhanced is the RFC 3463 enhanced status code without the leading
	// class separator, e.g. "4.3.0". Empty when unknown.
	Enhanced string
	// Message is the reply text. It may contain "\n" to produce a
	// multi-line reply.
	Message string
}

// New returns an *Error with the given parts.
func New(code int, enhanced, format string, args ...any) *Error {
	msg := format
	if len(args) > 0 {
		msg = fmt.Sprintf(format, args...)
	}
	return &Error{Code: code, Enhanced: enhanced, Message: msg}
}

// Error implements error.
func (e *Error) Error() string {
	if e.Enhanced != "" {
		return strconv.Itoa(e.Code) + " " + e.Enhanced + " " + e.Message
	}
	return strconv.Itoa(e.Code) + " " + e.Message
}

// Temporary reports whether the reply is a transient (4xx) failure.
func (e *Error) Temporary() bool { return e.Code >= 400 && e.Code < 500 }

// Permanent reports whether the reply is a permanent (5xx) failure.
func (e *Error) Permanent() bool { return e.Code >= 500 && e.Code < 600 }

// Positive reports whether the reply is a 2xx or 3xx reply.
func (e *Error) Positive() bool { return e.Code >= 200 && e.Code < 400 }

// AppendReply appends the wire form of the reply (one or more CRLF-terminated
// lines) to b and returns the extended slice. Enhanced codes are written on
// every line when set.
func (e *Error) AppendReply(b []byte) []byte {
	msg := e.Message
	for {
		line, rest, more := strings.Cut(msg, "\n")
		b = strconv.AppendInt(b, int64(e.Code), 10)
		if more {
			b = append(b, '-')
		} else {
			b = append(b, ' ')
		}
		if e.Enhanced != "" {
			b = append(b, e.Enhanced...)
			b = append(b, ' ')
		}
		b = append(b, line...)
		b = append(b, '\r', '\n')
		if !more {
			return b
		}
		msg = rest
	}
}

// Classify returns err as an *Error. An error that is not an *Error (or does
// not wrap one) becomes a temporary local error, 451 4.3.0, so that mail is
// deferred rather than lost.
func Classify(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Code: 451, Enhanced: "4.3.0", Message: "local error: " + err.Error()}
}

// IsTemporary reports whether err should cause a retry. Unknown errors are
// temporary.
func IsTemporary(err error) bool {
	if err == nil {
		return false
	}
	return !Classify(err).Permanent()
}
