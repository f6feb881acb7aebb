package bench

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Faults is a sink's fault-injection profile. Each decision is drawn from
// the connection's own random stream (seeded by SinkConfig.Seed and the
// connection's accept ordinal), so a client that talks over one connection
// at a time sees the same replies on every run with the same seed; with
// concurrent connections the configured rates hold on aggregate.
//
// Which rule applies:
//   - at connect, EHLO, MAIL and for MaxConnsPerIP: the rule of the local
//     address the client connected to (Addr, keyed by "ip:port" or "ip"),
//     else Default;
//   - at RCPT: the rule of the recipient's domain (Domain), else the
//     connection's rule;
//   - at DATA and its end: the rule that accepted the transaction's first
//     recipient.
//
// A Domain or Addr rule replaces Default entirely for what it covers.
type Faults struct {
	// Default applies where no Addr or Domain rule does. Default: no faults.
	Default FaultRule `toml:"default" json:"default"`
	// Domain holds rules per recipient domain (lower case). Default: none.
	Domain map[string]FaultRule `toml:"domain" json:"domain,omitempty"`
	// Addr holds rules per local listen address, "ip:port" or "ip".
	// Default: none.
	Addr map[string]FaultRule `toml:"addr" json:"addr,omitempty"`
}

// FaultRule is one set of injected faults.
type FaultRule struct {
	// Connect maps a reply code (as a string, e.g. "421") to the probability
	// of sending it instead of the 220 greeting. 421 closes the connection;
	// any other code makes the sink answer 503 to everything but QUIT, as
	// RFC 5321 asks after a 554 greeting. Default: none.
	Connect map[string]float64 `toml:"connect" json:"connect,omitempty"`
	// Mail, Rcpt and Data map reply codes (400–599) to the probability of
	// answering MAIL, RCPT or the end of DATA (or BDAT LAST) with that code.
	// 421 also closes the connection. Default: none.
	Mail map[string]float64 `toml:"mail" json:"mail,omitempty"`
	Rcpt map[string]float64 `toml:"rcpt" json:"rcpt,omitempty"`
	Data map[string]float64 `toml:"data" json:"data,omitempty"`
	// Delay is added before every reply this rule governs. Default: "0".
	Delay DelayDist `toml:"delay" json:"delay"`
	// DataDelay is added again before the reply to the end of DATA (the
	// time a real MX takes to commit a message). Default: "0".
	DataDelay DelayDist `toml:"data_delay" json:"data_delay"`
	// DropMidData is the probability of closing the connection without a
	// reply after the first line of message data. Default: 0.
	DropMidData float64 `toml:"drop_mid_data" json:"drop_mid_data,omitempty"`
	// MaxConnsPerIP caps concurrent connections per client IP; beyond it
	// the greeting is "421 4.7.0" and the connection is closed. Only
	// Default and Addr rules use it. Default: 0 (no cap).
	MaxConnsPerIP int `toml:"max_conns_per_ip" json:"max_conns_per_ip,omitempty"`
	// Greylist answers "451 4.7.1" to the first RCPT of each
	// (sender, recipient) pair, and to later ones until GreylistDelay has
	// passed since the first. Default: false.
	Greylist bool `toml:"greylist" json:"greylist,omitempty"`
	// GreylistDelay is how long a greylisted pair is refused. Default: 0
	// (the first retry passes).
	GreylistDelay time.Duration `toml:"greylist_delay" json:"greylist_delay,omitempty"`
	// Hang accepts the connection (Default or Addr rule) or the RCPT
	// (Domain rule) and then never answers: the sink flushes what it owes
	// and reads and discards until the client gives up. Default: false.
	Hang bool `toml:"hang" json:"hang,omitempty"`
}

// stage is a point in the SMTP dialogue where a fault can be injected.
type stage uint8

const (
	stageConnect stage = iota
	stageMail
	stageRcpt
	stageData
	numStages
)

func (s stage) String() string {
	switch s {
	case stageConnect:
		return "connect"
	case stageMail:
		return "mail"
	case stageRcpt:
		return "rcpt"
	case stageData:
		return "data"
	}
	return "stage(" + strconv.Itoa(int(s)) + ")"
}

type codeP struct {
	code int
	cum  float64 // cumulative probability up to and including this code
}

// rule is a compiled FaultRule.
type rule struct {
	codes      [numStages][]codeP
	delay      DelayDist
	dataDelay  DelayDist
	drop       float64
	maxPerIP   int
	grey       bool
	greyDelay  time.Duration
	hang       bool
	hasDelay   bool
	hasDataDel bool
}

// draw returns the code to inject at st, or 0.
func (r *rule) draw(st stage, rng *rand.Rand) int {
	cs := r.codes[st]
	if len(cs) == 0 {
		return 0
	}
	u := rng.Float64()
	for _, c := range cs {
		if u < c.cum {
			return c.code
		}
	}
	return 0
}

// validate appends the problems of fr to errs, naming keys under prefix.
func (fr *FaultRule) validate(prefix string, errs []error) []error {
	for st, m := range [...]map[string]float64{stageConnect: fr.Connect, stageMail: fr.Mail, stageRcpt: fr.Rcpt, stageData: fr.Data} {
		sum := 0.0
		for k, p := range m {
			key := prefix + stage(st).String() + "." + k
			if c, err := strconv.Atoi(k); err != nil || c < 400 || c > 599 {
				errs = append(errs, fmt.Errorf("%s: reply code must be 400..599", key))
			}
			if !(p >= 0 && p <= 1) {
				errs = append(errs, fmt.Errorf("%s: probability must be in [0, 1]", key))
			}
			sum += p
		}
		if sum > 1+1e-9 {
			errs = append(errs, fmt.Errorf("%s%s: probabilities add up to %g > 1", prefix, stage(st), sum))
		}
	}
	if !(fr.DropMidData >= 0 && fr.DropMidData <= 1) {
		errs = append(errs, fmt.Errorf("%sdrop_mid_data: must be in [0, 1]", prefix))
	}
	if fr.MaxConnsPerIP < 0 {
		errs = append(errs, fmt.Errorf("%smax_conns_per_ip: must be >= 0", prefix))
	}
	if fr.GreylistDelay < 0 {
		errs = append(errs, fmt.Errorf("%sgreylist_delay: must be >= 0", prefix))
	}
	return errs
}

func (fr *FaultRule) compile() *rule {
	r := &rule{
		delay:      fr.Delay,
		dataDelay:  fr.DataDelay,
		drop:       fr.DropMidData,
		maxPerIP:   fr.MaxConnsPerIP,
		grey:       fr.Greylist,
		greyDelay:  fr.GreylistDelay,
		hang:       fr.Hang,
		hasDelay:   !fr.Delay.IsZero(),
		hasDataDel: !fr.DataDelay.IsZero(),
	}
	for st, m := range [...]map[string]float64{stageConnect: fr.Connect, stageMail: fr.Mail, stageRcpt: fr.Rcpt, stageData: fr.Data} {
		var cs []codeP
		for k, p := range m {
			c, _ := strconv.Atoi(k)
			if p > 0 {
				cs = append(cs, codeP{code: c, cum: p})
			}
		}
		// A fixed order keeps the draws deterministic (map order is not).
		slices.SortFunc(cs, func(a, b codeP) int { return a.code - b.code })
		cum := 0.0
		for i := range cs {
			cum += cs[i].cum
			cs[i].cum = cum
		}
		r.codes[st] = cs
	}
	return r
}

// Validate reports every problem in f at once, with keys under "faults.".
func (f *Faults) Validate() error { return errors.Join(f.validate("faults.", nil)...) }

func (f *Faults) validate(prefix string, errs []error) []error {
	errs = f.Default.validate(prefix+"default.", errs)
	for _, d := range slices.Sorted(maps.Keys(f.Domain)) {
		fr := f.Domain[d]
		errs = fr.validate(fmt.Sprintf("%sdomain.%q.", prefix, d), errs)
	}
	for _, a := range slices.Sorted(maps.Keys(f.Addr)) {
		fr := f.Addr[a]
		errs = fr.validate(fmt.Sprintf("%saddr.%q.", prefix, a), errs)
	}
	return errs
}

// compiledFaults is a Faults ready for lookups.
type compiledFaults struct {
	def    *rule
	domain map[string]*rule
	addr   map[string]*rule
}

func (f *Faults) compile() compiledFaults {
	cf := compiledFaults{def: f.Default.compile(), domain: map[string]*rule{}, addr: map[string]*rule{}}
	for d, fr := range f.Domain {
		cf.domain[strings.ToLower(strings.TrimSuffix(d, "."))] = fr.compile()
	}
	for a, fr := range f.Addr {
		cf.addr[a] = fr.compile()
	}
	return cf
}

// forAddr returns the rule for a local address "ip:port".
func (cf *compiledFaults) forAddr(local string) *rule {
	if len(cf.addr) > 0 {
		if r, ok := cf.addr[local]; ok {
			return r
		}
		if i := strings.LastIndexByte(local, ':'); i > 0 {
			if r, ok := cf.addr[strings.Trim(local[:i], "[]")]; ok {
				return r
			}
		}
	}
	return cf.def
}

// faultReply returns the enhanced code and text of an injected reply.
func faultReply(st stage, code int) (string, string) {
	switch code {
	case 421:
		return "4.3.2", "Service not available, closing transmission channel (injected)"
	case 451:
		return "4.3.0", "Requested action aborted: local error (injected)"
	case 452:
		if st == stageRcpt {
			return "4.5.3", "Too many recipients (injected)"
		}
		return "4.3.1", "Insufficient system storage (injected)"
	case 550:
		switch st {
		case stageMail:
			return "5.7.1", "Sender rejected (injected)"
		case stageRcpt:
			return "5.1.1", "Mailbox unavailable (injected)"
		}
		return "5.7.1", "Message rejected (injected)"
	case 554:
		switch st {
		case stageConnect:
			return "5.7.1", "No SMTP service here (injected)"
		case stageData:
			return "5.6.0", "Transaction failed (injected)"
		}
		return "5.7.1", "Rejected (injected)"
	}
	if code < 500 {
		return "4.0.0", "Temporary failure (injected)"
	}
	return "5.0.0", "Permanent failure (injected)"
}

// LoadFaults reads a fault profile from a TOML file, or a JSON file when
// the name ends in ".json". Unknown keys are errors. The profile is
// validated.
func LoadFaults(path string) (Faults, error) {
	var f Faults
	data, err := os.ReadFile(path)
	if err != nil {
		return f, fmt.Errorf("bench: fault profile: %w", err)
	}
	if strings.EqualFold(filepath.Ext(path), ".json") {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			return f, fmt.Errorf("bench: fault profile %s: %w", path, err)
		}
	} else if err := decodeTOMLStrict(data, &f); err != nil {
		return f, fmt.Errorf("bench: fault profile %s: %w", path, err)
	}
	if err := f.Validate(); err != nil {
		return f, fmt.Errorf("bench: fault profile %s: %w", path, err)
	}
	return f, nil
}

// decodeTOMLStrict decodes data into v; keys that v has no field for are an
// error naming each key, except keys under the free-form tables named in
// free (decoded into maps, whose nested keys the decoder reports).
func decodeTOMLStrict(data []byte, v any, free ...string) error {
	md, err := toml.Decode(string(data), v)
	if err != nil {
		return err
	}
	var errs []error
	for _, k := range md.Undecoded() {
		if len(k) > 0 && slices.Contains(free, k[0]) {
			continue
		}
		errs = append(errs, fmt.Errorf("%s: unknown key", k))
	}
	return errors.Join(errs...)
}
