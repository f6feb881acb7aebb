package engine

import (
	"time"

	"github.com/hermod-mta/hermod/spool"
)

// warnDelay reports whether a recipient just deferred at now gets a
// "delayed" notification (DeliveryConfig.DelayWarning): its message has
// waited at least DelayWarning, its previous attempt (prev, the record
// before this one) came before that point or never was, so the warning
// goes out once per recipient without any state of its own, and its
// NOTIFY asks for delays (none given, or one with DELAY). Never for the
// null sender or Hermod's own notifications.
func (s *Scheduler) warnDelay(msg *spool.Message, prev *spool.Recipient, now time.Time) bool {
	w := s.cfg.DelayWarning
	if w <= 0 || msg.From == "" || msg.Bounce || !dsnWants(prev.Notify, DSNDelayed) {
		return false
	}
	due := msg.Received.Add(w)
	return !now.Before(due) && (prev.LastAttempt.IsZero() || prev.LastAttempt.Before(due))
}
