package netio

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// Bounds on the replies the outbound client accepts.
const (
	// clientMaxReplyLine is the longest reply line, CRLF included. RFC 5321
	// §4.5.3.1.5 says 512 octets; real servers exceed it (policy URLs in
	// rejections), so the client is lenient up to this bound.
	clientMaxReplyLine = 2048
	// clientMaxReplyLines is the most lines in one reply. An EHLO reply has
	// a few dozen at most.
	clientMaxReplyLines = 128
	// clientKeepReplyBuf is the capacity of the reply text buffer kept
	// between replies; a larger one (after a huge reply) is dropped.
	clientKeepReplyBuf = 4096
)

// ErrClientProtocol reports a reply that breaks the SMTP syntax (RFC 5321
// §4.2): a malformed or over-long line, a code that changes between the lines
// of a multi-line reply, an unexpected reply code, or data injected after the
// reply to STARTTLS. The connection is unusable afterwards. The error is of
// unknown kind, hence temporary for the caller.
var ErrClientProtocol = errors.New("netio: client: SMTP protocol error")

// ParseReply reads one SMTP reply, single- or multi-line, from r.
//
// Every line must start with the same three-digit code (first digit 2 to 5)
// followed by "-" (more lines follow), " " or the end of the line (last
// line). Lines end with CRLF; a bare LF is accepted. A line may be at most
// 2048 octets and a reply at most 128 lines. When the first line's text
// starts with an RFC 3463 enhanced status code whose class matches the reply
// code (ENHANCEDSTATUSCODES, RFC 2034), it goes to Enhanced and is stripped
// from every line that repeats it. The texts of the lines are joined with
// "\n" into Message.
//
// Errors: io.EOF when r ends before the reply starts, io.ErrUnexpectedEOF when
// it ends inside the reply, ErrClientProtocol (wrapped) for a malformed
// reply, or the error of r.
func ParseReply(r *bufio.Reader) (*smtperr.Error, error) {
	var p clientReplyReader
	code, err := p.read(r)
	if err != nil {
		return nil, err
	}
	return p.reply(code), nil
}

// clientReplyReader parses replies into a buffer it reuses, so that a reply
// whose *smtperr.Error is not needed costs no allocation.
type clientReplyReader struct {
	// text holds the enhanced code (its first enhLen bytes) followed by the
	// joined message of the last reply read.
	text   []byte
	enhLen int
	// long collects a line that does not fit in the bufio.Reader's buffer.
	long []byte
}

// read parses one reply into p.text and returns its code.
func (p *clientReplyReader) read(r *bufio.Reader) (int, error) {
	if cap(p.text) > clientKeepReplyBuf {
		p.text = nil
	}
	p.text = p.text[:0]
	p.enhLen = 0
	code := 0
	for n := 0; ; n++ {
		if n == clientMaxReplyLines {
			return 0, fmt.Errorf("%w: reply has more than %d lines", ErrClientProtocol, clientMaxReplyLines)
		}
		line, err := p.readLine(r)
		if err != nil {
			if err == io.EOF && n > 0 {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		c, text, last, ok := clientSplitReplyLine(line)
		if !ok {
			return 0, fmt.Errorf("%w: malformed reply line %q", ErrClientProtocol, clientClip(line))
		}
		if n == 0 {
			code = c
			if enh, rest, ok := clientCutEnhanced(text, c); ok {
				p.text = append(p.text, enh...)
				p.enhLen = len(enh)
				text = rest
			}
		} else {
			if c != code {
				return 0, fmt.Errorf("%w: reply code changes from %d to %d", ErrClientProtocol, code, c)
			}
			if p.enhLen > 0 {
				if enh, rest, ok := clientCutEnhanced(text, c); ok && string(enh) == string(p.text[:p.enhLen]) {
					text = rest
				}
			}
			p.text = append(p.text, '\n')
		}
		p.text = append(p.text, text...)
		if last {
			return code, nil
		}
	}
}

// reply returns the last reply read as an *smtperr.Error. The enhanced code
// and the message share one allocation.
func (p *clientReplyReader) reply(code int) *smtperr.Error {
	s := string(p.text)
	return &smtperr.Error{Code: code, Enhanced: s[:p.enhLen], Message: s[p.enhLen:]}
}

// same reports whether the last reply read is e.
func (p *clientReplyReader) same(code int, e *smtperr.Error) bool {
	if e == nil || e.Code != code || len(e.Enhanced) != p.enhLen || len(e.Message) != len(p.text)-p.enhLen {
		return false
	}
	return string(p.text[:p.enhLen]) == e.Enhanced && string(p.text[p.enhLen:]) == e.Message
}

// readLine returns the next line, terminator included. The slice is valid
// until the next read from r.
func (p *clientReplyReader) readLine(r *bufio.Reader) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err == nil {
		if len(line) > clientMaxReplyLine {
			return nil, clientErrLongLine
		}
		return line, nil
	}
	if err != bufio.ErrBufferFull {
		if err == io.EOF && len(line) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	// The line is longer than r's buffer: collect it in p.long.
	p.long = append(p.long[:0], line...)
	for {
		if len(p.long) > clientMaxReplyLine {
			return nil, clientErrLongLine
		}
		line, err = r.ReadSlice('\n')
		p.long = append(p.long, line...)
		switch {
		case err == nil:
			if len(p.long) > clientMaxReplyLine {
				return nil, clientErrLongLine
			}
			return p.long, nil
		case err == io.EOF:
			return nil, io.ErrUnexpectedEOF
		case err != bufio.ErrBufferFull:
			return nil, err
		}
	}
}

var clientErrLongLine = fmt.Errorf("%w: reply line longer than %d octets", ErrClientProtocol, clientMaxReplyLine)

// clientSplitReplyLine splits a reply line (terminator included) into its
// code and text, and reports whether it is the last line of the reply.
func clientSplitReplyLine(line []byte) (code int, text []byte, last, ok bool) {
	n := len(line)
	if n > 0 && line[n-1] == '\n' {
		n--
		if n > 0 && line[n-1] == '\r' {
			n--
		}
	}
	line = line[:n]
	if n < 3 || line[0] < '2' || line[0] > '5' || !clientIsDigit(line[1]) || !clientIsDigit(line[2]) {
		return 0, nil, false, false
	}
	code = int(line[0]-'0')*100 + int(line[1]-'0')*10 + int(line[2]-'0')
	if n == 3 {
		return code, nil, true, true
	}
	switch line[3] {
	case ' ':
		return code, line[4:], true, true
	case '-':
		return code, line[4:], false, true
	}
	return 0, nil, false, false
}

// clientCutEnhanced splits an RFC 3463 enhanced status code ("c.sss.ddd",
// subject and detail of 1 to 3 digits) off the start of text. The class c
// must match the first digit of code. The code must be followed by a space
// (which is dropped) or the end of the text.
func clientCutEnhanced(text []byte, code int) (enh, rest []byte, ok bool) {
	if len(text) < 5 || text[0] != byte('0'+code/100) || text[1] != '.' {
		return nil, nil, false
	}
	i := 2
	for part := 0; part < 2; part++ {
		j := i
		for j < len(text) && j-i < 4 && clientIsDigit(text[j]) {
			j++
		}
		if j == i || j-i > 3 {
			return nil, nil, false
		}
		i = j
		if part == 0 {
			if i >= len(text) || text[i] != '.' {
				return nil, nil, false
			}
			i++
		}
	}
	switch {
	case i == len(text):
		return text, nil, true
	case text[i] == ' ':
		return text[:i], text[i+1:], true
	}
	return nil, nil, false
}

func clientIsDigit(b byte) bool { return b >= '0' && b <= '9' }

// clientClip shortens b for an error message.
func clientClip(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}
