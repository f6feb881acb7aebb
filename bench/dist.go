package bench

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"
)

// ErrBadDist reports a distribution spec that cannot be parsed.
var ErrBadDist = errors.New("bench: bad distribution")

// distKind is the shape of a distribution.
type distKind uint8

const (
	distFixed distKind = iota
	distUniform
	distLogNormal
)

func (k distKind) String() string {
	switch k {
	case distFixed:
		return "fixed"
	case distUniform:
		return "uniform"
	case distLogNormal:
		return "lognormal"
	}
	return "distKind(" + strconv.Itoa(int(k)) + ")"
}

// dist is a distribution of non-negative values. Fixed: a. Uniform: [a, b].
// Log-normal: median a, shape sigma b, clamped to [lo, hi] (hi 0: no upper
// clamp).
type dist struct {
	kind   distKind
	a, b   float64
	lo, hi float64
}

func (d dist) sample(r *rand.Rand) float64 {
	switch d.kind {
	case distUniform:
		if d.b <= d.a {
			return d.a
		}
		return d.a + r.Float64()*(d.b-d.a)
	case distLogNormal:
		v := d.a * math.Exp(d.b*r.NormFloat64())
		if v < d.lo {
			v = d.lo
		}
		if d.hi > 0 && v > d.hi {
			v = d.hi
		}
		return v
	}
	return d.a
}

func (d dist) zero() bool { return d.kind == distFixed && d.a == 0 }

// format writes d in the syntax parseDist reads, using unit to print values.
func (d dist) format(unit func(float64) string) string {
	switch d.kind {
	case distUniform:
		return "uniform(" + unit(d.a) + "," + unit(d.b) + ")"
	case distLogNormal:
		s := "lognormal(" + unit(d.a) + "," + strconv.FormatFloat(d.b, 'g', -1, 64)
		if d.lo != 0 || d.hi != 0 {
			s += "," + unit(d.lo) + "," + unit(d.hi)
		}
		return s + ")"
	}
	return unit(d.a)
}

// parseDist reads "V", "fixed(V)", "uniform(MIN,MAX)" or
// "lognormal(MEDIAN,SIGMA[,MIN,MAX])", with values read by unit.
func parseDist(s string, unit func(string) (float64, error)) (dist, error) {
	s = strings.TrimSpace(s)
	name, args, isCall := strings.Cut(s, "(")
	if !isCall {
		v, err := unit(s)
		if err != nil {
			return dist{}, fmt.Errorf("%w: %q: %v", ErrBadDist, s, err)
		}
		if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
			return dist{}, fmt.Errorf("%w: %q: values must be finite and >= 0", ErrBadDist, s)
		}
		return dist{kind: distFixed, a: v}, nil
	}
	if !strings.HasSuffix(args, ")") {
		return dist{}, fmt.Errorf("%w: %q: missing ')'", ErrBadDist, s)
	}
	parts := strings.Split(strings.TrimSuffix(args, ")"), ",")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	vals := func(idx ...int) ([]float64, error) {
		out := make([]float64, len(idx))
		for i, j := range idx {
			var err error
			if j < 0 { // plain number
				out[i], err = strconv.ParseFloat(parts[-j-1], 64)
			} else {
				out[i], err = unit(parts[j])
			}
			if err != nil {
				return nil, fmt.Errorf("%w: %q: %v", ErrBadDist, s, err)
			}
			if out[i] < 0 || math.IsNaN(out[i]) || math.IsInf(out[i], 0) {
				return nil, fmt.Errorf("%w: %q: values must be finite and >= 0", ErrBadDist, s)
			}
		}
		return out, nil
	}
	switch strings.ToLower(strings.TrimSpace(name)) {
	case "fixed":
		if len(parts) != 1 {
			return dist{}, fmt.Errorf("%w: %q: fixed takes 1 value", ErrBadDist, s)
		}
		v, err := vals(0)
		if err != nil {
			return dist{}, err
		}
		return dist{kind: distFixed, a: v[0]}, nil
	case "uniform":
		if len(parts) != 2 {
			return dist{}, fmt.Errorf("%w: %q: uniform takes MIN,MAX", ErrBadDist, s)
		}
		v, err := vals(0, 1)
		if err != nil {
			return dist{}, err
		}
		if v[1] < v[0] {
			return dist{}, fmt.Errorf("%w: %q: MAX < MIN", ErrBadDist, s)
		}
		return dist{kind: distUniform, a: v[0], b: v[1]}, nil
	case "lognormal":
		var v []float64
		var err error
		switch len(parts) {
		case 2:
			v, err = vals(0, -2)
		case 4:
			v, err = vals(0, -2, 2, 3)
		default:
			return dist{}, fmt.Errorf("%w: %q: lognormal takes MEDIAN,SIGMA[,MIN,MAX]", ErrBadDist, s)
		}
		if err != nil {
			return dist{}, err
		}
		d := dist{kind: distLogNormal, a: v[0], b: v[1]}
		if len(v) == 4 {
			d.lo, d.hi = v[2], v[3]
			if d.hi != 0 && d.hi < d.lo {
				return dist{}, fmt.Errorf("%w: %q: MAX < MIN", ErrBadDist, s)
			}
		}
		return d, nil
	}
	return dist{}, fmt.Errorf("%w: %q: unknown kind %q (fixed, uniform, lognormal)", ErrBadDist, s, name)
}

// SizeDist is a distribution of message sizes in bytes. Its text form is a
// size ("1KiB", "512", "2MiB"; K/KB/KiB and M/MB/MiB are powers of 1024),
// "uniform(1KiB,100KiB)" or "lognormal(MEDIAN,SIGMA[,MIN,MAX])" such as
// "lognormal(8KiB,1.0,1KiB,1MiB)". The zero value is fixed at 0 bytes.
type SizeDist struct{ d dist }

// FixedSize returns a SizeDist that always yields n bytes.
func FixedSize(n int) SizeDist { return SizeDist{dist{kind: distFixed, a: float64(n)}} }

// ParseSizeDist parses the text form of a SizeDist.
func ParseSizeDist(s string) (SizeDist, error) {
	d, err := parseDist(s, parseSize)
	return SizeDist{d}, err
}

// Sample draws a size in bytes from r.
func (s SizeDist) Sample(r *rand.Rand) int { return int(s.d.sample(r) + 0.5) }

// IsZero reports whether s always yields 0.
func (s SizeDist) IsZero() bool { return s.d.zero() }

// String returns the text form.
func (s SizeDist) String() string { return s.d.format(formatSize) }

// MarshalText implements encoding.TextMarshaler.
func (s SizeDist) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *SizeDist) UnmarshalText(b []byte) error {
	v, err := ParseSizeDist(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// DelayDist is a distribution of delays. Its text form is a Go duration
// ("5ms", "0"), "uniform(1ms,10ms)" or "lognormal(MEDIAN,SIGMA[,MIN,MAX])"
// such as "lognormal(2ms,0.5,0s,1s)". The zero value is no delay.
type DelayDist struct{ d dist }

// FixedDelay returns a DelayDist that always yields d.
func FixedDelay(d time.Duration) DelayDist {
	return DelayDist{dist{kind: distFixed, a: float64(d)}}
}

// ParseDelayDist parses the text form of a DelayDist.
func ParseDelayDist(s string) (DelayDist, error) {
	d, err := parseDist(s, parseDelay)
	return DelayDist{d}, err
}

// Sample draws a delay from r.
func (d DelayDist) Sample(r *rand.Rand) time.Duration { return time.Duration(d.d.sample(r)) }

// IsZero reports whether d always yields 0.
func (d DelayDist) IsZero() bool { return d.d.zero() }

// String returns the text form.
func (d DelayDist) String() string { return d.d.format(formatDelay) }

// MarshalText implements encoding.TextMarshaler.
func (d DelayDist) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *DelayDist) UnmarshalText(b []byte) error {
	v, err := ParseDelayDist(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

func parseSize(s string) (float64, error) {
	num := strings.TrimRightFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	unit := strings.TrimSpace(s[len(num):])
	mult := 1.0
	switch strings.ToLower(unit) {
	case "", "b":
	case "k", "kb", "kib":
		mult = 1 << 10
	case "m", "mb", "mib":
		mult = 1 << 20
	case "g", "gb", "gib":
		mult = 1 << 30
	default:
		return 0, fmt.Errorf("unknown size unit %q", unit)
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil {
		return 0, err
	}
	return v * mult, nil
}

func formatSize(v float64) string {
	n := int64(v + 0.5)
	switch {
	case n != 0 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + "MiB"
	case n != 0 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + "KiB"
	}
	return strconv.FormatInt(n, 10)
}

func parseDelay(s string) (float64, error) {
	if s == "0" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	return float64(d), err
}

func formatDelay(v float64) string { return time.Duration(v).String() }
