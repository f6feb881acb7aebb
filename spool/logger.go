package spool

import (
	"errors"
	"fmt"
	"log/slog"
	"syscall"

	"github.com/cockroachdb/pebble/v2"
)

// fatalPanic is what the pebble logger adapter panics with when pebble
// reports a fatal error. The commit workers recover it (see Store.apply);
// anywhere else it ends the process, as pebble's default logger would.
type fatalPanic struct{ err error }

func (p fatalPanic) Error() string { return p.err.Error() }

// pebbleLogger adapts slog to pebble.Logger.
type pebbleLogger struct {
	log *slog.Logger
	// fatal puts the store into the failed state. It must not block.
	fatal func(error)
}

var _ pebble.Logger = pebbleLogger{}

func (l pebbleLogger) Infof(format string, args ...any) {
	l.log.Info(fmt.Sprintf(format, args...), "component", "pebble")
}

func (l pebbleLogger) Errorf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...), "component", "pebble")
}

// Fatalf is called by pebble when it cannot go on, among others on a WAL
// write or sync error during a commit ("fatal commit error"), on a failed
// WAL rotation and on a failed MANIFEST write. Pebble's own logger exits the
// process. Returning would be wrong: after a failed WAL sync pebble's Apply
// would return nil, i.e. report an unsynced batch as durable. So the
// adapter marks the store failed and panics; a commit worker recovers the
// panic and fails its waiters.
func (l pebbleLogger) Fatalf(format string, args ...any) {
	err := errors.New(fmt.Sprintf(format, args...))
	l.log.Error("pebble fatal error", "component", "pebble", "err", err)
	l.fatal(err)
	panic(fatalPanic{err: err})
}

// eventListener logs the pebble events an operator should see. A flush
// that fails for lack of space (ENOSPC) calls fail: pebble would retry it
// at once, again and again, while the memtables fill up and writes stall
// for good; the store fails instead, so that the daemon stops and is
// restarted (see Store.Failed) once there is room.
func eventListener(log *slog.Logger, fail func(error)) *pebble.EventListener {
	return &pebble.EventListener{
		BackgroundError: func(err error) {
			log.Error("pebble background error", "component", "pebble", "err", err)
		},
		WriteStallBegin: func(info pebble.WriteStallBeginInfo) {
			log.Warn("pebble write stall begin", "component", "pebble", "reason", info.Reason)
		},
		WriteStallEnd: func() {
			log.Warn("pebble write stall end", "component", "pebble")
		},
		DiskSlow: func(info pebble.DiskSlowInfo) {
			log.Warn("pebble disk slow", "component", "pebble", "path", info.Path,
				"op", info.OpType.String(), "duration", info.Duration)
		},
		FlushEnd: func(info pebble.FlushInfo) {
			if info.Err != nil {
				log.Error("pebble flush failed", "component", "pebble", "err", info.Err)
				if errors.Is(info.Err, syscall.ENOSPC) {
					fail(fmt.Errorf("pebble flush: %w", info.Err))
				}
				return
			}
			log.Debug("pebble flush", "component", "pebble", "info", info.String())
		},
		CompactionEnd: func(info pebble.CompactionInfo) {
			if info.Err != nil {
				log.Error("pebble compaction failed", "component", "pebble", "err", info.Err)
				return
			}
			log.Debug("pebble compaction", "component", "pebble", "info", info.String())
		},
	}
}
