package bench

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"
)

func TestProgressPlain(t *testing.T) {
	var b bytes.Buffer
	p := newProgress(&b)
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	p.update("one")
	p.update("two") // too soon: dropped
	now = now.Add(6 * time.Second)
	p.update("three")
	p.note("a note")
	p.done("final")
	if got, want := b.String(), "one\nthree\na note\nfinal\n"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if strings.Contains(b.String(), "\r") {
		t.Error("carriage return written to a non-terminal")
	}
	var nilP *progress
	nilP.update("x") // no panic
	newProgress(nil).note("x")
}

func TestProgressTTY(t *testing.T) {
	var b bytes.Buffer
	p := newProgress(&b)
	p.tty = true
	p.update("long line")
	p.update("short")
	p.note("n")
	p.update("again")
	p.done("end")
	want := "\rlong line" + "\rshort    " + "\r     \r" + "n\n" + "\ragain" +
		"\r     \r" + "end\n"
	if got := b.String(); got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

func TestIsTerminal(t *testing.T) {
	if isTerminal(&bytes.Buffer{}) {
		t.Error("a buffer is not a terminal")
	}
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if isTerminal(f) {
		t.Error("a regular file is not a terminal")
	}
}
