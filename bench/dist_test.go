package bench

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestParseSizeDist(t *testing.T) {
	cases := []struct {
		in, out string
	}{
		{"1024", "1KiB"},
		{"1KiB", "1KiB"},
		{"1k", "1KiB"},
		{"1.5MiB", "1536KiB"},
		{"100", "100"},
		{" fixed(2KB) ", "2KiB"},
		{"uniform(1KiB, 100KiB)", "uniform(1KiB,100KiB)"},
		{"lognormal(8KiB,1)", "lognormal(8KiB,1)"},
		{"lognormal(8KiB,0.5,1KiB,1MiB)", "lognormal(8KiB,0.5,1KiB,1MiB)"},
	}
	for _, c := range cases {
		d, err := ParseSizeDist(c.in)
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if got := d.String(); got != c.out {
			t.Errorf("%q: String %q, want %q", c.in, got, c.out)
		}
		var back SizeDist
		if err := back.UnmarshalText([]byte(d.String())); err != nil || back != d {
			t.Errorf("%q: does not round-trip: %v %v", c.in, back, err)
		}
	}
	for _, bad := range []string{"", "x", "1XB", "uniform(2,1)", "uniform(1)", "lognormal(1)", "lognormal(1,2,3)",
		"gamma(1,2)", "uniform(1,2", "-5", "lognormal(1KiB,1,2KiB,1KiB)"} {
		if _, err := ParseSizeDist(bad); !errors.Is(err, ErrBadDist) {
			t.Errorf("%q: err %v, want ErrBadDist", bad, err)
		}
	}
}

func TestParseDelayDist(t *testing.T) {
	for in, out := range map[string]string{
		"0":                          "0s",
		"5ms":                        "5ms",
		"uniform(1ms,10ms)":          "uniform(1ms,10ms)",
		"lognormal(2ms,0.5,0s,1s)":   "lognormal(2ms,0.5,0s,1s)",
		"lognormal(2ms, 0.5, 0, 1s)": "lognormal(2ms,0.5,0s,1s)",
	} {
		d, err := ParseDelayDist(in)
		if err != nil || d.String() != out {
			t.Errorf("%q: %q %v, want %q", in, d.String(), err, out)
		}
	}
	if _, err := ParseDelayDist("5"); err == nil {
		t.Error("a bare number is not a duration")
	}
	if !(DelayDist{}).IsZero() || FixedDelay(time.Millisecond).IsZero() {
		t.Error("IsZero")
	}
}

func TestDistSamples(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 1))
	const n = 20000
	u, _ := ParseSizeDist("uniform(1000,2000)")
	ln, _ := ParseSizeDist("lognormal(8KiB,1,1KiB,64KiB)")
	var us, ls []int
	for i := 0; i < n; i++ {
		us = append(us, u.Sample(r))
		ls = append(ls, ln.Sample(r))
	}
	slices.Sort(us)
	slices.Sort(ls)
	if us[0] < 1000 || us[n-1] > 2000 || us[n/2] < 1450 || us[n/2] > 1550 {
		t.Errorf("uniform: min %d median %d max %d", us[0], us[n/2], us[n-1])
	}
	if ls[0] != 1024 || ls[n-1] != 64<<10 {
		t.Errorf("lognormal clamp: min %d max %d", ls[0], ls[n-1])
	}
	if m := ls[n/2]; m < 7500 || m > 8900 {
		t.Errorf("lognormal median %d, want about 8192", m)
	}
	if got := FixedSize(77).Sample(r); got != 77 {
		t.Errorf("fixed: %d", got)
	}
}
