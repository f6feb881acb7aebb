package engine

import (
	"fmt"
	"time"

	"github.com/hermod-mta/hermod/internal/smtperr"
	"github.com/hermod-mta/hermod/spool"
)

// Outcome classes of one recipient's delivery attempt.
type outcomeClass uint8

const (
	outDelivered outcomeClass = iota // 2xx after the final dot
	outDeferred                      // 4xx, network failure, timeout, unknown error
	outBounced                       // 5xx, null MX, no such domain
	// outMore: refused for their number (X.5.3, "too many recipients")
	// in a transaction that delivered others: sent again at once, in a
	// new transaction (RFC 5321 §4.5.3.1.10), not after a backoff.
	outMore
)

func (c outcomeClass) String() string {
	switch c {
	case outDelivered:
		return "delivered"
	case outDeferred:
		return "deferred"
	case outBounced:
		return "bounced"
	case outMore:
		return "more"
	}
	return fmt.Sprintf("outcome(%d)", int(c))
}

// classify maps a reply (or, when nil, an error) to an outcome class and
// the text recorded for it. Unknown errors defer: mail is never dropped on
// an error we do not understand.
func classify(reply *smtperr.Error, err error) (outcomeClass, *smtperr.Error) {
	if reply == nil {
		if err == nil {
			return outDeferred, smtperr.New(451, "4.3.0", "no reply")
		}
		reply = smtperr.Classify(err)
	}
	switch {
	case reply.Code >= 200 && reply.Code < 300:
		return outDelivered, reply
	case reply.Permanent():
		return outBounced, reply
	default:
		return outDeferred, reply
	}
}

// transition computes a recipient's next spool record after an attempt at
// now: delivered and bounced are final; a deferral is retried after the
// backoff of its attempt count, or expires (and bounces) once the message
// has been queued for MaxQueueLifetime. u in [0, 1) draws the jitter.
func transition(cfg *DeliveryConfig, msg *spool.Message, r spool.Recipient, class outcomeClass, reply string, now time.Time, u float64) (spool.Recipient, outcomeClass, bool) {
	if class != outMore {
		// A recipient sent again for the server's recipient limit was
		// not refused: its retry schedule does not move on.
		r.Attempts++
	}
	r.LastAttempt = now
	r.LastReply = reply
	switch class {
	case outDelivered:
		r.State = spool.Delivered
		return r, class, false
	case outBounced:
		r.State = spool.Bounced
		return r, class, false
	}
	expires := msg.Received.Add(cfg.MaxQueueLifetime)
	if !now.Before(expires) {
		r.State = spool.Expired
		return r, outBounced, true
	}
	if class == outMore {
		r.NextAttempt = now
		return r, outMore, false
	}
	// The last retry happens when the lifetime ends, not after.
	r.NextAttempt = minTime(now.Add(cfg.retryDelay(int(r.Attempts), u)), expires)
	return r, outDeferred, false
}

// suspend returns a recipient's record when its destination is backed off:
// this is not an attempt (Attempts is unchanged); the recipient waits until
// the destination may be tried again, or expires if it was already tried
// and its lifetime is over.
func suspend(cfg *DeliveryConfig, msg *spool.Message, r spool.Recipient, now, until time.Time, reason string) (spool.Recipient, bool) {
	expires := msg.Received.Add(cfg.MaxQueueLifetime)
	r.LastReply = reason
	if !now.Before(expires) && r.Attempts > 0 {
		r.State = spool.Expired
		return r, true
	}
	r.NextAttempt = minTime(until, maxTime(expires, now))
	return r, false
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
