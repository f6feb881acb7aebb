package netio

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
)

// ClientEnvelope is the envelope of one outbound transaction. (The name
// Envelope belongs to the server's session.)
type ClientEnvelope struct {
	// From is the reverse-path without angle brackets; "" is the null
	// reverse-path <> used by bounces.
	From string
	// Rcpts are the forward-paths, without angle brackets. At least one.
	Rcpts []string
	// Size is the message size announced with SIZE= and checked against
	// the server's limit. 0 means len(body).
	Size int64
	// Body8Bit says the body has 8-bit content: BODY=8BITMIME is sent, and
	// a server without 8BITMIME gets nothing (554 5.6.3, RFC 6152 §3)
	// unless the body has no octet above 127 after all: it is then sent
	// to that server without the parameter.
	Body8Bit bool
	// SMTPUTF8 says the envelope or header has UTF-8 (RFC 6531). It is
	// implied by a non-ASCII address. A server without SMTPUTF8 gets nothing
	// (554 5.6.7).
	SMTPUTF8 bool
	// EnvID is the DSN envelope identifier (RFC 3461 §4.4), unencoded; it is
	// sent xtext-encoded as ENVID= when the server offers DSN.
	EnvID string
	// Ret is the DSN RET= value, "FULL" or "HDRS", or "" for none. It is
	// sent when the server offers DSN.
	Ret string
	// RcptParams are extra RCPT parameters, one string per recipient in the
	// order of Rcpts (e.g. "NOTIFY=FAILURE ORCPT=rfc822;a@example.org",
	// already encoded), sent when the server offers DSN. nil for none.
	RcptParams []string
}

// ClientTiming splits the time Send took, in the manner of Postfix's
// delays=: envelope exchange, body transfer, wait for the final reply.
type ClientTiming struct {
	// Envelope is from the start of Send to the reply to DATA.
	Envelope time.Duration
	// Wrote is the time taken to write the body and the final dot.
	Wrote time.Duration
	// Acked is the wait for the reply to the final dot.
	Acked time.Duration
}

// SendResult holds the replies of one transaction. The *smtperr.Error
// values may be shared with other results of the same connection and must
// not be modified.
type SendResult struct {
	// Mail is the reply to MAIL.
	Mail *smtperr.Error
	// Rcpts holds one reply per recipient, in order. When MAIL was refused
	// every entry is the MAIL reply. nil when the transaction was cut short
	// before that reply arrived.
	Rcpts []*smtperr.Error
	// Data is the reply to the final dot, or the refusal of DATA itself,
	// when at least one recipient was accepted; nil otherwise.
	Data *smtperr.Error
	// Timing says where the time went.
	Timing ClientTiming

	// one backs Rcpts for a single recipient, saving an allocation.
	one [1]*smtperr.Error
}

// Outcome returns the reply that decides the fate of recipient i: its RCPT
// reply when that was not 2xx, otherwise the DATA reply. nil means unknown
// (the transaction was cut short): the error returned by Send decides.
func (r *SendResult) Outcome(i int) *smtperr.Error {
	if rc := r.Rcpts[i]; rc == nil || rc.Code/100 != 2 {
		return rc
	}
	return r.Data
}

// ErrClientEnvelope reports an envelope Send cannot transmit: no
// recipients, an address with CR, LF, NUL or angle brackets, RcptParams of
// the wrong length, or an unknown Ret. Nothing is sent; the connection
// stays usable.
var ErrClientEnvelope = errors.New("netio: client: invalid envelope")

// Send runs one mail transaction: MAIL, RCPT for every recipient, and DATA
// with body when at least one recipient was accepted.
//
// body is the message as stored, with CRLF line endings. It is sent
// dot-stuffed; any bare LF or bare CR is sent as CRLF; a missing final CRLF
// is added before the terminating dot.
//
// When the server offers PIPELINING, MAIL, all RCPT and DATA are written at
// once and the replies read in order (RFC 2920); otherwise each command
// waits for its reply. (The replies to a pipelined group wait in the socket
// buffers until the group is written: that holds thousands of recipients,
// far more than the hundred RFC 5321 §4.5.3.1.8 asks servers to take.) SIZE=, BODY=8BITMIME, SMTPUTF8, RET=, ENVID= and the
// RcptParams are sent when offered and needed. If a pipelined DATA gets 354
// although no recipient was accepted, the client sends only the final dot
// (RFC 2920 §3.1).
//
// Before anything is sent, Send refuses with a permanent *smtperr.Error a
// message the server cannot take: 552 5.3.4 when Size exceeds the server's
// SIZE, 554 5.6.3 when it needs 8BITMIME, 554 5.6.7 when it needs SMTPUTF8
// and the server lacks it. The connection stays usable.
//
// Otherwise the result holds every reply received. A non-nil error (network
// error, timeout, cancelled ctx, malformed reply) means the transaction was
// cut short and the connection is unusable; the partial result tells which
// replies arrived (see SendResult.Outcome). A server that refuses the
// message while it is being sent (552 for a size limit it did not
// advertise, 554 for content, a 4xx) and closes makes the write fail: the
// replies it sent first, read for up to earlyReplyWait, are then the
// result, with no error (the connection is unusable).
func (c *ClientConn) Send(ctx context.Context, env *ClientEnvelope, body []byte) (*SendResult, error) {
	if !c.Usable() {
		return nil, ErrClientUnusable
	}
	size, utf8, err := c.precheck(env, body)
	if err != nil {
		return nil, err
	}

	stop := c.watch(ctx)
	res, err := c.send(env, body, size, utf8)
	c.checkInStep()
	if stop != nil && !stop() {
		// The connection was closed under the transaction. A complete
		// result stays valid (the message may have been accepted).
		c.broken = true
		if err != nil {
			err = fmt.Errorf("netio: client: %s: %w (%v)", c.mx, context.Cause(ctx), err)
		}
	}
	return res, err
}

// send runs the transaction; Send has checked the envelope.
func (c *ClientConn) send(env *ClientEnvelope, body []byte, size int64, utf8 bool) (*SendResult, error) {
	res := newSendResult(env)
	start := time.Now()
	pipe := c.exts&clientExtPipelining != 0
	c.wtimeout = c.cfg.DataBlockTimeout

	reset := c.needReset
	c.needReset = false
	if !pipe {
		return c.sendLockStep(res, env, body, size, utf8, reset, start)
	}
	if c.exts&clientExtChunking != 0 {
		return c.sendChunked(res, env, body, size, utf8, reset, start)
	}
	c.writeEnvelope(env, size, utf8, reset)
	if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
		return res, c.ioError("MAIL", err)
	}
	data, err := c.readEnvelope(res, env, reset)
	if err != nil {
		return res, err
	}
	t354 := time.Now()
	res.Timing.Envelope = t354.Sub(start)
	if data == clientDataNone {
		return res, nil
	}
	c.writeData(data, body)
	end := c.outPos()
	if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
		if data == clientDataBody && c.earlyReply(res, end) {
			return res, nil
		}
		return res, c.ioError("DATA body", err)
	}
	return res, c.readDataEnd(res, data, t354)
}

// newSendResult returns an empty result for env.
func newSendResult(env *ClientEnvelope) *SendResult {
	res := &SendResult{}
	if len(env.Rcpts) == 1 {
		res.Rcpts = res.one[:]
	} else {
		res.Rcpts = make([]*smtperr.Error, len(env.Rcpts))
	}
	return res
}

// clientData says what follows the reply to a pipelined DATA.
type clientData uint8

const (
	// clientDataNone: DATA was refused; nothing is sent.
	clientDataNone clientData = iota
	// clientDataBody: the message and the final dot.
	clientDataBody
	// clientDataDot: only the final dot, because DATA got 354 although no
	// recipient was accepted (RFC 2920 §3.1).
	clientDataDot
)

// writeEnvelope buffers a pipelined envelope: RSET when reset, MAIL, every
// RCPT and DATA.
func (c *ClientConn) writeEnvelope(env *ClientEnvelope, size int64, utf8, reset bool) {
	if reset {
		c.bw.WriteString("RSET\r\n")
	}
	c.writeMail(env, size, utf8)
	for i := range env.Rcpts {
		c.writeRcpt(env, i)
	}
	c.bw.WriteString("DATA\r\n")
}

// readEnvelope reads the replies to an envelope written by writeEnvelope
// into res and says what is to be sent next. When DATA was refused after
// MAIL was accepted, the transaction is left open: the next one starts with
// RSET.
func (c *ClientConn) readEnvelope(res *SendResult, env *ClientEnvelope, reset bool) (clientData, error) {
	if reset {
		if err := c.readReset(); err != nil {
			return clientDataNone, err
		}
	}
	mail, err := c.reply(c.cfg.MailTimeout, clientStepMail)
	if err != nil {
		return clientDataNone, c.ioError("MAIL", err)
	}
	res.Mail = mail
	mailOK := mail.Code/100 == 2
	accepted := 0
	for i := range env.Rcpts {
		rep, err := c.reply(c.cfg.RcptTimeout, clientStepRcpt)
		if err != nil {
			return clientDataNone, c.ioError("RCPT", err)
		}
		if !mailOK {
			// Replies to RCPT after a refused MAIL say nothing about the
			// recipient (typically 503).
			rep = mail
		}
		res.Rcpts[i] = rep
		if rep.Code/100 == 2 {
			accepted++
		}
	}
	ok := mailOK && accepted > 0
	rep, err := c.reply(c.cfg.DataInitTimeout, clientStepDataInit)
	if err != nil {
		return clientDataNone, c.ioError("DATA", err)
	}
	switch {
	case rep.Code != 354:
		if ok {
			res.Data = rep
		}
		c.needReset = mailOK && c.closing == nil
		return clientDataNone, nil
	case !ok:
		return clientDataDot, nil
	}
	return clientDataBody, nil
}

// writeData buffers what follows a 354: the dot-stuffed body and the final
// dot, or the final dot alone (after which the next transaction starts
// with RSET: the server should have refused the empty message).
func (c *ClientConn) writeData(data clientData, body []byte) {
	c.wtimeout = c.cfg.DataBlockTimeout
	switch data {
	case clientDataBody:
		clientWriteBody(c.bw, body)
	case clientDataDot:
		c.bw.WriteString(".\r\n")
		c.needReset = true
	}
}

// readDataEnd reads the reply to the final dot written by writeData.
func (c *ClientConn) readDataEnd(res *SendResult, data clientData, t354 time.Time) error {
	wrote := time.Now()
	if data == clientDataDot {
		if _, err := c.reply(c.cfg.DataTermTimeout, clientStepCount); err != nil {
			return c.ioError("end of DATA", err)
		}
		return nil
	}
	res.Timing.Wrote = wrote.Sub(t354)
	rep, err := c.reply(c.cfg.DataTermTimeout, clientStepDot)
	if err != nil {
		return c.ioError("end of DATA", err)
	}
	res.Timing.Acked = time.Since(wrote)
	res.Data = rep
	return nil
}

// sendLockStep runs the transaction without PIPELINING: each command waits
// for its reply.
func (c *ClientConn) sendLockStep(res *SendResult, env *ClientEnvelope, body []byte, size int64, utf8, reset bool, start time.Time) (*SendResult, error) {
	if reset {
		c.bw.WriteString("RSET\r\n")
		if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
			return res, c.ioError("RSET", err)
		}
		if err := c.readReset(); err != nil {
			return res, err
		}
	}
	c.writeMail(env, size, utf8)
	if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
		return res, c.ioError("MAIL", err)
	}
	mail, err := c.reply(c.cfg.MailTimeout, clientStepMail)
	if err != nil {
		return res, c.ioError("MAIL", err)
	}
	res.Mail = mail
	if mail.Code/100 != 2 {
		for i := range res.Rcpts {
			res.Rcpts[i] = mail
		}
		res.Timing.Envelope = time.Since(start)
		return res, nil
	}
	accepted := 0
	for i := range env.Rcpts {
		if c.closing == nil {
			c.writeRcpt(env, i)
			if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
				return res, c.ioError("RCPT", err)
			}
		}
		rep, err := c.reply(c.cfg.RcptTimeout, clientStepRcpt)
		if err != nil {
			return res, c.ioError("RCPT", err)
		}
		res.Rcpts[i] = rep
		if rep.Code/100 == 2 {
			accepted++
		}
	}
	if accepted == 0 {
		res.Timing.Envelope = time.Since(start)
		c.needReset = c.closing == nil
		return res, nil
	}
	if c.closing == nil {
		c.bw.WriteString("DATA\r\n")
		if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
			return res, c.ioError("DATA", err)
		}
	}
	rep, err := c.reply(c.cfg.DataInitTimeout, clientStepDataInit)
	if err != nil {
		return res, c.ioError("DATA", err)
	}
	t354 := time.Now()
	res.Timing.Envelope = t354.Sub(start)
	if rep.Code != 354 {
		res.Data = rep
		c.needReset = c.closing == nil
		return res, nil
	}
	c.writeData(clientDataBody, body)
	end := c.outPos()
	if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
		if c.earlyReply(res, end) {
			return res, nil
		}
		return res, c.ioError("DATA body", err)
	}
	return res, c.readDataEnd(res, clientDataBody, t354)
}

// sendChunked runs the transaction with CHUNKING (RFC 3030) over
// PIPELINING: MAIL, every RCPT and "BDAT n LAST" with the whole message go
// out in one write, and the replies come back in one round trip. The
// message is sent as is (no dot-stuffing), its line endings normalised to
// CRLF. A server must consume a BDAT chunk even when it refuses it, so the
// connection stays in step when MAIL or every RCPT was refused. A server
// may also answer a BDAT before its chunk and close (RFC 3030 §2): when the
// write fails, the replies it sent first decide the result if they are
// complete and end with a refusal.
func (c *ClientConn) sendChunked(res *SendResult, env *ClientEnvelope, body []byte, size int64, utf8, reset bool, start time.Time) (*SendResult, error) {
	begin := c.outPos()
	if reset {
		c.bw.WriteString("RSET\r\n")
	}
	c.writeChunked(env, body, size, utf8)
	end := c.outPos()
	if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
		failed := c.ioError("BDAT", err)
		if begin >= c.wrote {
			// Nothing went out: no reply can be about this transaction.
			return res, failed
		}
		c.early = time.Now().Add(earlyReplyWait)
		_, err := c.readChunked(res, env, reset, time.Now(), end > c.wrote)
		c.early = time.Time{}
		if err != nil {
			return res, failed
		}
		if res.Data != nil {
			c.log.Debug("reply before the end of the BDAT chunk", "reply", res.Data.Error())
		}
		return res, nil
	}
	wrote := time.Now()
	res.Timing.Wrote = wrote.Sub(start)
	return c.readChunked(res, env, reset, wrote, false)
}

// writeChunked buffers MAIL, every RCPT and "BDAT n LAST" with the message.
func (c *ClientConn) writeChunked(env *ClientEnvelope, body []byte, size int64, utf8 bool) {
	body = clientNormalize(body)
	c.writeMail(env, size, utf8)
	for i := range env.Rcpts {
		c.writeRcpt(env, i)
	}
	c.bw.WriteString("BDAT ")
	c.bw.WriteString(strconv.Itoa(len(body)))
	c.bw.WriteString(" LAST\r\n")
	c.wtimeout = c.cfg.DataBlockTimeout
	c.bw.Write(body)
}

// readChunked reads the replies of a transaction written by writeChunked
// (after the reply to RSET when reset). partial says the transaction could
// not be written whole: the reply to BDAT then counts only as an early
// refusal (4xx or 5xx); anything else is an error.
func (c *ClientConn) readChunked(res *SendResult, env *ClientEnvelope, reset bool, wrote time.Time, partial bool) (*SendResult, error) {
	if reset {
		if err := c.readReset(); err != nil {
			return res, err
		}
	}
	mail, err := c.reply(c.cfg.MailTimeout, clientStepMail)
	if err != nil {
		return res, c.ioError("MAIL", err)
	}
	res.Mail = mail
	mailOK := mail.Code/100 == 2
	accepted := 0
	for i := range env.Rcpts {
		rep, err := c.reply(c.cfg.RcptTimeout, clientStepRcpt)
		if err != nil {
			return res, c.ioError("RCPT", err)
		}
		if !mailOK {
			rep = mail
		}
		res.Rcpts[i] = rep
		if rep.Code/100 == 2 {
			accepted++
		}
	}
	rep, err := c.reply(c.cfg.DataTermTimeout, clientStepDot)
	if err != nil {
		return res, c.ioError("BDAT", err)
	}
	if partial && rep.Code/100 != 4 && rep.Code/100 != 5 {
		return res, c.ioError("BDAT", fmt.Errorf("%w: reply %v to a chunk not sent whole", ErrClientProtocol, rep))
	}
	res.Timing.Acked = time.Since(wrote)
	if mailOK && accepted > 0 {
		res.Data = rep
		if rep.Code/100 != 2 {
			c.needReset = c.closing == nil
		}
	} else {
		c.needReset = mailOK && c.closing == nil
	}
	return res, nil
}

// SendBatch runs several transactions over the connection. When the
// server offers PIPELINING and CHUNKING they all go out in one write — each
// after the first preceded by RSET, each a MAIL, its RCPTs and "BDAT n
// LAST" with the message (RFC 2920 lets BDAT be followed by more commands
// in a group) — and their replies come back in one round trip. With
// PIPELINING alone, each message goes out in one write with the envelope
// of the next transaction behind its final dot (RFC 2920 §3.1: message
// content may be the first "command" of a group): n transactions take n+1
// writes and round trips instead of 2n. Without PIPELINING they are sent
// one after another with Send.
//
// It returns a result and an error per transaction, with Send's meaning. A
// transaction Send would refuse before sending (size, 8BITMIME, SMTPUTF8,
// malformed envelope) gets its error and is skipped. When the connection
// fails, the transactions whose replies had not all arrived get the error
// (and the partial result); the connection is then unusable. When a write
// fails (the server refused a message while it was being sent and
// closed), the replies the server had sent are read first, for up to
// earlyReplyWait: a transaction written whole keeps the outcome its
// replies give (a 250 is a delivery, not to be sent again), the one being
// written takes its early refusal as with Send, and a transaction of which
// nothing was written, or whose replies did not all arrive, gets the
// error.
func (c *ClientConn) SendBatch(ctx context.Context, envs []*ClientEnvelope, bodies [][]byte) ([]*SendResult, []error) {
	results := make([]*SendResult, len(envs))
	errs := make([]error, len(envs))
	if len(envs) == 1 || c.exts&clientExtPipelining == 0 {
		for i := range envs {
			if !c.Usable() {
				errs[i] = ErrClientUnusable
				continue
			}
			results[i], errs[i] = c.Send(ctx, envs[i], bodies[i])
		}
		return results, errs
	}
	if !c.Usable() {
		for i := range errs {
			errs[i] = ErrClientUnusable
		}
		return results, errs
	}
	// Refuse what cannot be sent before anything is.
	sent := make([]clientPending, 0, len(envs))
	for i, env := range envs {
		size, utf8, err := c.precheck(env, bodies[i])
		if err != nil {
			errs[i] = err
			continue
		}
		results[i] = newSendResult(env)
		sent = append(sent, clientPending{i: i, size: size, utf8: utf8})
	}
	if len(sent) == 0 {
		return results, errs
	}
	stop := c.watch(ctx)
	if c.exts&clientExtChunking != 0 {
		c.sendBatchChunked(envs, bodies, results, errs, sent)
	} else {
		c.sendBatchData(envs, bodies, results, errs, sent)
	}
	c.checkInStep()
	if stop != nil && !stop() {
		c.broken = true
		for _, p := range sent {
			if errs[p.i] != nil {
				errs[p.i] = fmt.Errorf("netio: client: %s: %w (%v)", c.mx, context.Cause(ctx), errs[p.i])
			}
		}
	}
	return results, errs
}

// clientPending is a transaction of a batch that passed precheck.
type clientPending struct {
	i     int // index in the batch
	size  int64
	utf8  bool
	reset bool // preceded by RSET
	// begin and end are the output positions (outPos) of the
	// transaction's first octet and of the octet after its last, in a
	// batch written at once.
	begin, end int64
}

// sendBatchChunked writes every transaction of sent at once (with CHUNKING)
// and reads their replies.
func (c *ClientConn) sendBatchChunked(envs []*ClientEnvelope, bodies [][]byte, results []*SendResult, errs []error, sent []clientPending) {
	start := time.Now()
	for k := range sent {
		p := &sent[k]
		p.reset = c.needReset || k > 0
		c.needReset = false
		p.begin = c.outPos()
		if p.reset {
			c.bw.WriteString("RSET\r\n")
		}
		c.writeChunked(envs[p.i], bodies[p.i], p.size, p.utf8)
		p.end = c.outPos()
	}
	// cut is the error of a failed write. The replies the server sent
	// before it are still read, in order, for the transactions of which
	// something was written: the earlier ones may have been delivered.
	var cut, failed error
	if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
		cut = c.ioError("BDAT", err)
		c.early = time.Now().Add(earlyReplyWait)
	}
	wrote := time.Now()
	for _, p := range sent {
		switch {
		case failed != nil:
			errs[p.i] = failed
			continue
		case cut != nil && p.begin >= c.wrote:
			errs[p.i] = cut
			continue
		}
		results[p.i].Timing.Wrote = wrote.Sub(start)
		partial := cut != nil && p.end > c.wrote
		if _, err := c.readChunked(results[p.i], envs[p.i], p.reset, wrote, partial); err != nil {
			if cut != nil {
				err = cut
			}
			failed = err
			errs[p.i] = err
		}
	}
	c.early = time.Time{}
}

// sendBatchData runs the transactions of sent with DATA, pipelining the
// envelope of each behind the message of the one before: after the reply
// to DATA, one write carries the message, its final dot and the next
// RSET (when needed), MAIL, RCPTs and DATA; the replies to the dot and to
// those commands then come back together.
func (c *ClientConn) sendBatchData(envs []*ClientEnvelope, bodies [][]byte, results []*SendResult, errs []error, sent []clientPending) {
	var failed error
	start := time.Now()
	first := &sent[0]
	first.reset = c.needReset
	c.needReset = false
	c.wtimeout = c.cfg.DataBlockTimeout
	c.writeEnvelope(envs[first.i], first.size, first.utf8, first.reset)
	if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
		failed = c.ioError("MAIL", err)
	}
	for k, p := range sent {
		if failed != nil {
			errs[p.i] = failed
			continue
		}
		res := results[p.i]
		data, err := c.readEnvelope(res, envs[p.i], p.reset)
		if err != nil {
			failed = err
			errs[p.i] = err
			continue
		}
		t354 := time.Now()
		res.Timing.Envelope = t354.Sub(start)
		step := "MAIL"
		var end int64
		if data != clientDataNone {
			c.writeData(data, bodies[p.i])
			end = c.outPos()
			step = "DATA body"
		}
		// The next envelope goes behind, unless the server is closing the
		// connection (a 421 to DATA).
		more := k+1 < len(sent)
		wroteNext := more && c.Usable()
		if wroteNext {
			next := &sent[k+1]
			next.reset = c.needReset
			c.needReset = false
			c.writeEnvelope(envs[next.i], next.size, next.utf8, next.reset)
		}
		if c.bw.Buffered() > 0 || c.wfailed {
			if err := c.flush(c.cfg.DataBlockTimeout); err != nil {
				failed = c.ioError(step, err)
				// The messages before this one have all their replies;
				// this one may have been refused early (the next
				// envelope, behind it, is not read: it gets the error).
				if data != clientDataBody || !c.earlyReply(res, end) {
					errs[p.i] = failed
				}
				continue
			}
		}
		start = time.Now()
		if data != clientDataNone {
			if err := c.readDataEnd(res, data, t354); err != nil {
				failed = err
				errs[p.i] = err
				continue
			}
		}
		if more && !wroteNext {
			// The rest was not sent.
			failed = ErrClientUnusable
		}
	}
}

// precheck refuses, before anything is sent, a transaction the server
// cannot take, and returns the size to announce and whether SMTPUTF8 is
// needed.
func (c *ClientConn) precheck(env *ClientEnvelope, body []byte) (int64, bool, error) {
	if err := clientCheckEnvelope(env); err != nil {
		return 0, false, err
	}
	utf8 := clientNeedsUTF8(env)
	size := env.Size
	if size <= 0 {
		size = int64(len(body))
	}
	if utf8 && c.exts&clientExtSMTPUTF8 == 0 && c.downgradeUTF8(env, body) {
		utf8 = false
	}
	switch {
	case utf8 && c.exts&clientExtSMTPUTF8 == 0:
		return 0, false, smtperr.New(554, "5.6.7", "%s does not support SMTPUTF8, which this message needs", c.mx)
	case env.Body8Bit && c.exts&clientExt8BitMIME == 0 && !clientASCII(body):
		return 0, false, smtperr.New(554, "5.6.3", "%s does not support 8BITMIME, which this message needs", c.mx)
	case c.maxSize > 0 && size > c.maxSize:
		return 0, false, smtperr.New(552, "5.3.4", "message size %d exceeds the limit of %d of %s", size, c.maxSize, c.mx)
	}
	return size, utf8, nil
}

// clientNormalize returns body with every line ending CRLF and a final
// CRLF, copying only when it must.
func clientNormalize(body []byte) []byte {
	clean := len(body) >= 2 && body[len(body)-2] == '\r' && body[len(body)-1] == '\n'
	for i := 0; clean && i < len(body); {
		j := clientIndexEOL(body[i:])
		if j < 0 {
			break
		}
		j += i
		if body[j] != '\r' || j+1 >= len(body) || body[j+1] != '\n' {
			clean = false
			break
		}
		i = j + 2
	}
	if clean || len(body) == 0 {
		return body
	}
	out := make([]byte, 0, len(body)+len(body)/32+2)
	for len(body) > 0 {
		i := clientIndexEOL(body)
		if i < 0 {
			out = append(out, body...)
			break
		}
		out = append(out, body[:i]...)
		out = append(out, '\r', '\n')
		if body[i] == '\r' && i+1 < len(body) && body[i+1] == '\n' {
			i++
		}
		body = body[i+1:]
	}
	if n := len(out); n < 2 || out[n-2] != '\r' || out[n-1] != '\n' {
		out = append(out, '\r', '\n')
	}
	return out
}

// reply reads the reply to a command of a transaction. After a 421 the
// server is gone: the 421 stands for every reply still due. A reply whose
// class does not fit the command is a protocol error.
func (c *ClientConn) reply(timeout time.Duration, step clientStep) (*smtperr.Error, error) {
	if c.closing != nil {
		return c.closing, nil
	}
	if !c.early.IsZero() {
		timeout = min(timeout, time.Until(c.early))
	}
	rep, err := c.readReply(timeout, step)
	if err != nil {
		return nil, err
	}
	class := rep.Code / 100
	switch {
	case rep.Code == 421:
		c.closing = rep
		c.broken = true
	case class == 3 && step != clientStepDataInit, class == 2 && step == clientStepDataInit:
		c.broken = true
		return nil, fmt.Errorf("%w: unexpected reply %v", ErrClientProtocol, rep)
	}
	return rep, nil
}

// earlyReplyWait bounds the wait for the replies sent before the server
// stopped reading a message (a DATA body, a BDAT chunk, a batch).
const earlyReplyWait = 2 * time.Second

// earlyReply looks, once the body could not be written, for a refusal the
// server sent before it stopped reading (552 for a message over a limit it
// did not advertise, 554 for refused content) and closed: Linux keeps such
// a reply readable after the connection's reset. That reply is then the
// message's outcome (res.Data) instead of a network error retried until
// the message expires. end is the output position after the final dot: a
// positive reply counts only when the dot went out whole (in a batch the
// next envelope follows it in the same write). The connection is unusable
// either way.
func (c *ClientConn) earlyReply(res *SendResult, end int64) bool {
	c.broken = true
	if c.closing != nil {
		return false
	}
	rep, err := c.readReply(earlyReplyWait, clientStepDot)
	if err != nil {
		return false
	}
	switch rep.Code / 100 {
	case 4, 5:
	case 2:
		if end > c.wrote {
			return false
		}
	default:
		return false
	}
	c.log.Debug("reply read after the message could not be written", "reply", rep.Error())
	res.Data = rep
	return true
}

// outPos returns the output position of the next octet buffered: octets
// the socket took since Dial plus those waiting in bw. Once a write failed
// the positions of what is buffered after are unknown: it returns the
// largest, so that such octets count as not written.
func (c *ClientConn) outPos() int64 {
	if c.wfailed {
		return math.MaxInt64
	}
	return c.wrote + int64(c.bw.Buffered())
}

// checkInStep ends the use of the connection when input is waiting after
// the last reply due: the server sent more replies than commands, and the
// surplus would be read as the replies of the next transaction (with
// CHUNKING nothing like DATA's 354 would catch the shift, and a refused
// message would be counted delivered).
func (c *ClientConn) checkInStep() {
	if c.br.Buffered() > 0 {
		c.broken = true
		c.log.Debug("input after the last reply, connection not reused", "octets", c.br.Buffered())
	}
}

// readReset reads the reply to RSET. A refusal says nothing about the
// transaction behind it (the session is out of step): it is a protocol
// error, which does not carry the reply's code, so that the messages are
// retried rather than bounced.
func (c *ClientConn) readReset() error {
	rep, err := c.reply(c.cfg.MailTimeout, clientStepReset)
	switch {
	case err != nil:
		return c.ioError("RSET", err)
	case rep.Code == 421:
		// The server was closing before this transaction began: an idle
		// timeout or shutdown notice waiting in a cached connection's
		// socket (Postfix's smtpd sends "421 4.4.2 ... timeout
		// exceeded"). No reply is about the messages, so the caller may
		// send them again at once on a new connection.
		c.broken = true
		return fmt.Errorf("netio: client: %s closed the connection before the transaction: %w", c.mx, rep)
	case rep.Code/100 != 2:
		c.broken = true
		return fmt.Errorf("netio: client: %s RSET: %w: refused with %v", c.mx, ErrClientProtocol, rep)
	}
	return nil
}

// writeMail buffers the MAIL command.
func (c *ClientConn) writeMail(env *ClientEnvelope, size int64, utf8 bool) {
	w := c.bw
	w.WriteString("MAIL FROM:<")
	w.WriteString(env.From)
	w.WriteByte('>')
	if c.exts&clientExtSize != 0 {
		w.WriteString(" SIZE=")
		w.Write(strconv.AppendInt(c.num[:0], size, 10))
	}
	if env.Body8Bit && c.exts&clientExt8BitMIME != 0 {
		w.WriteString(" BODY=8BITMIME")
	}
	if utf8 {
		w.WriteString(" SMTPUTF8")
	}
	if c.exts&clientExtDSN != 0 {
		if env.Ret != "" {
			w.WriteString(" RET=")
			w.WriteString(strings.ToUpper(env.Ret))
		}
		if env.EnvID != "" {
			w.WriteString(" ENVID=")
			clientWriteXtext(w, env.EnvID)
		}
	}
	w.WriteString("\r\n")
}

// writeRcpt buffers the RCPT command for recipient i.
func (c *ClientConn) writeRcpt(env *ClientEnvelope, i int) {
	w := c.bw
	w.WriteString("RCPT TO:<")
	w.WriteString(env.Rcpts[i])
	w.WriteByte('>')
	if c.exts&clientExtDSN != 0 && env.RcptParams != nil && env.RcptParams[i] != "" {
		w.WriteByte(' ')
		w.WriteString(env.RcptParams[i])
	}
	w.WriteString("\r\n")
}

// clientWriteBody writes body as DATA content: dot-stuffed (RFC 5321
// §4.5.2), every line ending (CRLF, bare LF, bare CR) as CRLF, a final CRLF
// added when missing, then the terminating ".\r\n".
func clientWriteBody(w *bufio.Writer, body []byte) {
	for len(body) > 0 {
		if body[0] == '.' {
			w.WriteByte('.')
		}
		i := clientIndexEOL(body)
		if i < 0 {
			w.Write(body)
			w.WriteString("\r\n")
			break
		}
		w.Write(body[:i])
		w.WriteString("\r\n")
		if body[i] == '\r' && i+1 < len(body) && body[i+1] == '\n' {
			i++
		}
		body = body[i+1:]
	}
	w.WriteString(".\r\n")
}

// clientIndexEOL returns the index of the first CR or LF in b, or -1.
func clientIndexEOL(b []byte) int {
	n := bytes.IndexByte(b, '\n')
	head := b
	if n >= 0 {
		head = b[:n]
	}
	if r := bytes.IndexByte(head, '\r'); r >= 0 {
		return r
	}
	return n
}

// clientWriteXtext writes s in xtext (RFC 3461 §4): printable ASCII other
// than "+" and "=" as is, every other octet as "+XX".
func clientWriteXtext(w *bufio.Writer, s string) {
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		b := s[i]
		if b < '!' || b > '~' || b == '+' || b == '=' {
			w.WriteByte('+')
			w.WriteByte(hex[b>>4])
			w.WriteByte(hex[b&15])
			continue
		}
		w.WriteByte(b)
	}
}

// clientCheckEnvelope rejects envelopes that cannot be written safely.
func clientCheckEnvelope(env *ClientEnvelope) error {
	if len(env.Rcpts) == 0 {
		return fmt.Errorf("%w: no recipients", ErrClientEnvelope)
	}
	if strings.ContainsAny(env.From, "\r\n\x00<>") {
		return fmt.Errorf("%w: bad reverse-path %q", ErrClientEnvelope, env.From)
	}
	for _, r := range env.Rcpts {
		if r == "" || strings.ContainsAny(r, "\r\n\x00<>") {
			return fmt.Errorf("%w: bad forward-path %q", ErrClientEnvelope, r)
		}
	}
	if env.RcptParams != nil {
		if len(env.RcptParams) != len(env.Rcpts) {
			return fmt.Errorf("%w: %d RcptParams for %d recipients", ErrClientEnvelope, len(env.RcptParams), len(env.Rcpts))
		}
		for _, p := range env.RcptParams {
			if strings.ContainsAny(p, "\r\n\x00") {
				return fmt.Errorf("%w: bad RCPT parameters %q", ErrClientEnvelope, p)
			}
		}
	}
	switch strings.ToUpper(env.Ret) {
	case "", "FULL", "HDRS":
	default:
		return fmt.Errorf("%w: RET must be FULL or HDRS, got %q", ErrClientEnvelope, env.Ret)
	}
	return nil
}

// clientNeedsUTF8 reports whether the transaction needs SMTPUTF8.
// downgradeUTF8 reports whether a message declared SMTPUTF8 may go without
// it to a server lacking the extension: nothing in it needs SMTPUTF8 (RFC
// 6531 §3.2 forbids only sending what does). Its addresses and header
// section are ASCII, and its body is ASCII or declared 8-bit to a server
// offering 8BITMIME. Postfix sends such mail the same way.
func (c *ClientConn) downgradeUTF8(env *ClientEnvelope, body []byte) bool {
	if !env.SMTPUTF8 || !clientASCII(env.From) {
		return false
	}
	for _, r := range env.Rcpts {
		if !clientASCII(r) {
			return false
		}
	}
	header := body
	if i := bytes.Index(body, []byte("\r\n\r\n")); i >= 0 {
		header = body[:i]
	}
	if !clientASCII(header) {
		return false
	}
	return clientASCII(body) || env.Body8Bit && c.exts&clientExt8BitMIME != 0
}

func clientNeedsUTF8(env *ClientEnvelope) bool {
	if env.SMTPUTF8 || !clientASCII(env.From) {
		return true
	}
	for _, r := range env.Rcpts {
		if !clientASCII(r) {
			return true
		}
	}
	return false
}

func clientASCII[T string | []byte](s T) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
