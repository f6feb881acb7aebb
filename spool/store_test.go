package spool

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

func TestCommitLoadBody(t *testing.T) {
	for _, comp := range []string{CompressionS2, CompressionZstd, CompressionNone} {
		t.Run(comp, func(t *testing.T) {
			cfg := memConfig(vfs.NewMem())
			cfg.Compression = comp
			s := openT(t, cfg)
			defer s.Close()
			m := testMessage(1, "a@X.Test", "b@y.test")
			m.Rcpts[1].NextAttempt = t0.Add(time.Hour)
			m.Received = t0
			m.Body8Bit, m.EnvID, m.Ret = true, "env-1", "HDRS"
			body := testBody(1, 5000)
			if err := s.CommitWait(m, body); err != nil {
				t.Fatal(err)
			}
			got, err := s.Load(m.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.From != m.From || len(got.Rcpts) != 2 || got.Rcpts[0].Domain != "x.test" ||
				!got.Rcpts[1].NextAttempt.Equal(t0.Add(time.Hour)) || !got.Received.Equal(t0) ||
				got.Size != 5000 || !got.Body8Bit || got.EnvID != "env-1" || got.Ret != "HDRS" {
				t.Fatalf("Load = %+v", got)
			}
			gb, err := s.Body(m.ID)
			if err != nil || !bytes.Equal(gb, body) {
				t.Fatalf("Body: %v, equal=%v", err, bytes.Equal(gb, body))
			}
			if _, err := s.Load(MakeID(1, 0)); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Load(missing) = %v", err)
			}
			if _, err := s.Body(MakeID(1, 0)); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Body(missing) = %v", err)
			}
			if st := s.Stats(); st.Messages != 1 {
				t.Fatalf("Stats = %+v", st)
			}
		})
	}
}
