package smtperr

import (
	"errors"
	"fmt"
	"testing"
)

func TestAppendReply(t *testing.T) {
	cases := []struct {
		e    *Error
		want string
	}{
		{New(250, "2.0.0", "OK"), "250 2.0.0 OK\r\n"},
		{New(220, "", "mx ready"), "220 mx ready\r\n"},
		{New(250, "", "mx\nPIPELINING\nSIZE 10"), "250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n"},
		{New(550, "5.1.1", "no such user: %s", "a@b"), "550 5.1.1 no such user: a@b\r\n"},
	}
	for _, c := range cases {
		if got := string(c.e.AppendReply(nil)); got != c.want {
			t.Errorf("AppendReply(%v) = %q, want %q", c.e, got, c.want)
		}
	}
}

func TestClassify(t *testing.T) {
	perm := New(550, "5.1.1", "unknown")
	if got := Classify(fmt.Errorf("wrapped: %w", perm)); got != perm {
		t.Fatalf("Classify did not unwrap: %v", got)
	}
	if IsTemporary(perm) {
		t.Fatal("550 is not temporary")
	}
	if !IsTemporary(errors.New("disk on fire")) {
		t.Fatal("unknown errors must be temporary")
	}
	if got := Classify(errors.New("x")); got.Code != 451 || got.Enhanced != "4.3.0" {
		t.Fatalf("unknown error classified as %v", got)
	}
	if Classify(nil) != nil {
		t.Fatal("Classify(nil) != nil")
	}
}
