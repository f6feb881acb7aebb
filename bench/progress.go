package bench

import (
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// progress prints a run's progress to a writer: on a terminal one line
// rewritten in place (carriage return), elsewhere a plain line every
// plainEvery. Notes are printed on lines of their own. A nil writer prints
// nothing. Safe for concurrent use.
type progress struct {
	mu         sync.Mutex
	w          io.Writer
	tty        bool
	plainEvery time.Duration
	last       time.Time
	width      int // of the line on screen (tty)
	now        func() time.Time
}

func newProgress(w io.Writer) *progress {
	return &progress{w: w, tty: isTerminal(w), plainEvery: 5 * time.Second, now: time.Now}
}

// isTerminal reports whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// update shows line as the current state.
func (p *progress) update(line string) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty {
		pad := ""
		if n := p.width - len(line); n > 0 {
			pad = strings.Repeat(" ", n)
		}
		_, _ = io.WriteString(p.w, "\r"+line+pad)
		p.width = len(line)
		return
	}
	now := p.now()
	if !p.last.IsZero() && now.Sub(p.last) < p.plainEvery {
		return
	}
	p.last = now
	_, _ = io.WriteString(p.w, line+"\n")
}

// note prints line on a line of its own (after clearing a progress line).
func (p *progress) note(line string) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clearLocked()
	_, _ = io.WriteString(p.w, line+"\n")
}

// done prints the last state on its own line (always, even when a plain
// line was printed recently) and starts afresh.
func (p *progress) done(line string) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty {
		p.clearLocked()
	}
	_, _ = io.WriteString(p.w, line+"\n")
	p.last = time.Time{}
}

func (p *progress) clearLocked() {
	if p.tty && p.width > 0 {
		_, _ = io.WriteString(p.w, "\r"+strings.Repeat(" ", p.width)+"\r")
		p.width = 0
	}
}
