package netio

import "sync/atomic"

// contentBudget bounds the message content all the sessions of a server
// hold in memory at once (ServerConfig.MaxBufferedBytes): bodies being
// received and bodies waiting for their commit. Sessions reserve octets in
// growing steps (see Session.appendBody) and give them back when the body
// is dropped or its commit ends. A nil budget is unlimited (sessions made
// without a server).
type contentBudget struct {
	max     int64
	used    atomic.Int64
	refused atomic.Int64 // messages and MAIL commands refused for it
}

// budgetStep is the largest step of reservations (they start at 4 KiB and
// double): one atomic operation per 64 KiB of a large message.
const budgetStep = 64 << 10

func newContentBudget(max int64) *contentBudget { return &contentBudget{max: max} }

// reserve takes n octets, or reports false (taking nothing) when that
// would exceed the budget.
func (b *contentBudget) reserve(n int64) bool {
	if b == nil {
		return true
	}
	if b.used.Add(n) > b.max {
		b.used.Add(-n)
		b.refused.Add(1)
		return false
	}
	return true
}

// release gives back n octets.
func (b *contentBudget) release(n int64) {
	if b != nil && n > 0 {
		b.used.Add(-n)
	}
}

// budgetFirstStep is the first reservation of a body (Session.appendBody):
// a message needs at least this much room, however small it is.
const budgetFirstStep = 4 << 10

// spent reports whether no message can fit any more, less room being left
// than a body's first reservation: MAIL is then refused. (Not only when
// nothing at all is left: a BDAT chunk read whole reserves an octet count
// that is no multiple of the steps, which can leave a few octets no
// message could use, and MAIL would be taken for a message certain to be
// refused at its end.)
func (b *contentBudget) spent() bool {
	if b == nil || b.max-b.used.Load() >= budgetFirstStep {
		return false
	}
	b.refused.Add(1)
	return true
}

// Buffered returns the octets reserved now, 0 for a nil budget.
func (b *contentBudget) buffered() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}
