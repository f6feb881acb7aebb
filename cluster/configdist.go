package cluster

// Single-point configuration: one node takes a master configuration
// document, numbers it, applies it, and every other node fetches it from a
// member that runs it.
//
// Invariants:
//   - A node advertises (tag "cv") only a version it has applied and
//     stored: ConfigVersion N in a member's tags means GET
//     /api/cluster/config on that member returns version N (or newer).
//   - Versions only grow on a node. A pushed version is one more than
//     the highest version this node has seen anywhere (its own, every
//     member's tag, announcements, refusals), so a push supersedes every
//     version any node runs.
//   - A version that Apply refused is never retried on this node (the
//     reason is kept and reported by Status); a failed fetch is retried
//     every RetryInterval while some member advertises a newer version.
//   - Applies are serialized (one at a time, in version order of arrival)
//     and never run on serf's event goroutine.
//
// Failure at each step: a push whose local Apply fails changes nothing
// and returns the reason (ErrConfigRefused). A store failure after a
// successful Apply returns the error without announcing the version. A
// lost announcement is caught up through member tags (join/update events
// and the periodic check), so a node joining later also fetches the
// newest version. Two pushes at the same moment on two nodes may take the
// same number with different documents: each node runs one of them, and
// Wait reports the others as "conflict" (a different digest); pushing
// again resolves it.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Names shared by the nodes and the admin API.
const (
	// ConfigEvent is the user event announcing a pushed version.
	ConfigEvent = "hermod-config"
	// ConfigPath serves a node's running master document (GET) and takes
	// a push (POST, in cmd/hermod).
	ConfigPath = "/api/cluster/config"
	// ConfigStatusPath serves a node's ConfigStatus.
	ConfigStatusPath = "/api/cluster/config/status"
	// ConfigVersionHeader carries the version of the document served on
	// ConfigPath.
	ConfigVersionHeader = "X-Hermod-Config-Version"
	// MaxConfigSize bounds a master document.
	MaxConfigSize = 1 << 20

	masterFile   = "master-config.toml"
	masterHeader = "# hermod master configuration, version "
	maxRefusals  = 16
)

// ErrConfigRefused wraps the reason a document was not applied.
var ErrConfigRefused = errors.New("configuration refused")

// ConfigDistOptions are a ConfigDist's collaborators.
type ConfigDistOptions struct {
	// Logger gets operational messages; nil discards them.
	Logger *slog.Logger
	// Dir keeps the newest applied document (master-config.toml).
	Dir string
	// Apply validates doc and applies it to the running node, or returns
	// why not (nothing is changed then). note says what did not take
	// effect live (for example sections that need a restart). It is
	// called for a push on the pushing node too, before anything is
	// announced, and never concurrently with itself.
	Apply func(doc []byte, version uint64) (note string, err error)
	// StoredErr is non-nil when the node could not run the stored
	// document at startup (it runs its local file instead): its version
	// is then reported as refused with this reason, and the node
	// advertises version 0 until it applies a newer one.
	StoredErr error
	// Client fetches documents and statuses from peers. nil: a client
	// with a 5 s timeout.
	Client *http.Client
	// RetryInterval is how often a node behind its peers retries a
	// fetch. Default: 2s.
	RetryInterval time.Duration
}

// ConfigRefusal is a version a node did not apply, and why.
type ConfigRefusal struct {
	Version uint64    `json:"version"`
	Error   string    `json:"error"`
	At      time.Time `json:"at"`
}

// ConfigStatus is what a node runs (GET /api/cluster/config/status).
type ConfigStatus struct {
	Node string `json:"node"`
	// Version is the running master version (0: none, the local file).
	Version uint64 `json:"version"`
	// Digest identifies the running document (sha256, 16 hex digits).
	Digest string `json:"digest,omitempty"`
	// Note is what Apply said did not take effect live.
	Note string `json:"note,omitempty"`
	// Refused is the last version this node refused.
	Refused *ConfigRefusal `json:"refused,omitempty"`
}

// ConfigDist distributes the cluster's master configuration. Create it
// with NewConfigDist before the Node starts (it registers its event
// handlers), call Start once Apply can run, Close before the Node.
// Methods are safe for concurrent use.
type ConfigDist struct {
	node   *Node
	opt    ConfigDistOptions
	log    *slog.Logger
	client *http.Client

	applyMu sync.Mutex // held across Apply + store: one apply at a time

	mu       sync.Mutex
	version  uint64
	doc      []byte
	note     string
	hints    map[uint64]configAnnounce // announced versions newer than ours
	refused  map[uint64]ConfigRefusal
	lastRef  *ConfigRefusal
	started  bool
	stopOnce sync.Once

	kick chan struct{}
	stop chan struct{}
	wg   sync.WaitGroup
}

// configAnnounce is the payload of ConfigEvent (JSON, well under serf's
// 512-byte user event limit: node names are at most 64 bytes).
type configAnnounce struct {
	Version uint64 `json:"v"`
	Digest  string `json:"d"`
	Origin  string `json:"o"`
}

// NewConfigDist loads the stored document, publishes its version in the
// node's tags and registers the event handlers. Call it before
// node.Start.
func NewConfigDist(node *Node, opt ConfigDistOptions) (*ConfigDist, error) {
	if opt.Apply == nil {
		return nil, errors.New("cluster: ConfigDist needs Apply")
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	if opt.Client == nil {
		opt.Client = &http.Client{Timeout: 5 * time.Second}
	}
	if opt.RetryInterval <= 0 {
		opt.RetryInterval = 2 * time.Second
	}
	if err := os.MkdirAll(opt.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("cluster: config state: %w", err)
	}
	c := &ConfigDist{
		node: node, opt: opt, log: opt.Logger, client: opt.Client,
		hints: map[uint64]configAnnounce{}, refused: map[uint64]ConfigRefusal{},
		kick: make(chan struct{}, 1), stop: make(chan struct{}),
	}
	doc, v, err := LoadMasterConfig(opt.Dir)
	if err != nil {
		return nil, err
	}
	switch {
	case v == 0:
	case opt.StoredErr != nil:
		c.refuse(v, opt.StoredErr)
	default:
		c.version, c.doc = v, doc
	}
	if err := node.SetConfigVersion(c.version); err != nil {
		return nil, err
	}
	node.HandleUserEvent(ConfigEvent, c.handleEvent)
	node.OnMemberChange(c.memberChange)
	return c, nil
}

// Start begins fetching newer versions from peers (announced ones, and
// any a member advertises).
func (c *ConfigDist) Start() {
	c.mu.Lock()
	if c.started {
		c.mu.Unlock()
		return
	}
	c.started = true
	c.mu.Unlock()
	c.wg.Add(1)
	go c.loop()
	c.poke()
}

// Close stops fetching and waits for an apply in progress.
func (c *ConfigDist) Close() {
	c.stopOnce.Do(func() { close(c.stop) })
	c.wg.Wait()
}

// Status is this node's running version and last refusal.
func (c *ConfigDist) Status() ConfigStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := ConfigStatus{Node: c.node.Name(), Version: c.version, Note: c.note}
	if c.doc != nil {
		st.Digest = digest(c.doc)
	}
	if c.lastRef != nil {
		r := *c.lastRef
		st.Refused = &r
	}
	return st
}

// Document returns the running master document and its version (nil, 0
// when the node runs its local file only).
func (c *ConfigDist) Document() ([]byte, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.doc, c.version
}

// Push numbers doc, applies it here (refusing it with Apply's reason),
// stores it, advertises its version and announces it to the cluster.
// Peers fetch and apply it in the background; Wait follows them.
func (c *ConfigDist) Push(doc []byte) (uint64, error) {
	if len(doc) > MaxConfigSize {
		return 0, fmt.Errorf("%w: larger than %d bytes", ErrConfigRefused, MaxConfigSize)
	}
	doc = bytes.Clone(doc)
	c.applyMu.Lock()
	defer c.applyMu.Unlock()
	v := c.nextVersion()
	note, err := c.opt.Apply(doc, v)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrConfigRefused, err)
	}
	if err := c.commit(doc, v, note); err != nil {
		return 0, err
	}
	c.log.Info("cluster configuration pushed", "version", v, "digest", digest(doc), "note", note)
	p, _ := json.Marshal(configAnnounce{Version: v, Digest: digest(doc), Origin: c.node.Name()})
	if err := c.node.Broadcast(ConfigEvent, p); err != nil {
		// Peers still see the version in our tags.
		c.log.Warn("announcing the cluster configuration", "version", v, "err", err)
	}
	return v, nil
}

// nextVersion is one more than any version seen. Call with applyMu held.
func (c *ConfigDist) nextVersion() uint64 {
	c.mu.Lock()
	v := c.version
	for h := range c.hints {
		v = max(v, h)
	}
	for r := range c.refused {
		v = max(v, r)
	}
	c.mu.Unlock()
	for _, m := range c.node.Members() {
		v = max(v, m.ConfigVersion)
	}
	if _, sv, err := LoadMasterConfig(c.opt.Dir); err == nil {
		v = max(v, sv)
	}
	return v + 1
}

// commit stores doc as version v and advertises it. Call with applyMu
// held, after a successful Apply.
func (c *ConfigDist) commit(doc []byte, v uint64, note string) error {
	if err := WriteMasterConfig(c.opt.Dir, doc, v); err != nil {
		return err
	}
	c.mu.Lock()
	c.version, c.doc, c.note = v, doc, note
	for h := range c.hints {
		if h <= v {
			delete(c.hints, h)
		}
	}
	c.mu.Unlock()
	if err := c.node.SetConfigVersion(v); err != nil {
		c.log.Warn("advertising the configuration version", "version", v, "err", err)
	}
	return nil
}

func (c *ConfigDist) refuse(v uint64, err error) {
	r := ConfigRefusal{Version: v, Error: err.Error(), At: time.Now()}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.refused[v] = r
	c.lastRef = &r
	delete(c.hints, v)
	if len(c.refused) > maxRefusals {
		oldest := v
		for k := range c.refused {
			oldest = min(oldest, k)
		}
		delete(c.refused, oldest)
	}
}

// handleEvent runs on serf's event goroutine: it only records the hint.
func (c *ConfigDist) handleEvent(payload []byte) {
	var a configAnnounce
	if err := json.Unmarshal(payload, &a); err != nil || a.Version == 0 {
		c.log.Warn("ignoring a malformed configuration announcement", "err", err)
		return
	}
	c.mu.Lock()
	_, refused := c.refused[a.Version]
	newer := a.Version > c.version && !refused
	if newer {
		c.hints[a.Version] = a
	}
	c.mu.Unlock()
	if newer {
		c.log.Info("cluster configuration announced", "version", a.Version, "origin", a.Origin)
		c.poke()
	}
}

// memberChange runs on serf's event goroutine: a member advertising a
// newer version (a late join, a missed announcement) wakes the fetcher.
func (c *ConfigDist) memberChange(ch MemberChange) {
	c.mu.Lock()
	cur := c.version
	c.mu.Unlock()
	for _, m := range ch.Members {
		if m.Alive() && m.ConfigVersion > cur {
			c.poke()
			return
		}
	}
}

func (c *ConfigDist) poke() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *ConfigDist) loop() {
	defer c.wg.Done()
	t := time.NewTicker(c.opt.RetryInterval)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-c.kick:
		case <-t.C:
		}
		c.catchUp()
	}
}

// source is a member to fetch from, and the version it should have.
type source struct {
	name, addr string
	version    uint64
}

// sources lists the members to fetch from, newest version first: those
// advertising a version newer than ours that we did not refuse, and the
// origins of announcements (their tags may not have arrived yet).
func (c *ConfigDist) sources() []source {
	c.mu.Lock()
	cur := c.version
	hints := make([]configAnnounce, 0, len(c.hints))
	for _, h := range c.hints {
		hints = append(hints, h)
	}
	refused := make(map[uint64]bool, len(c.refused))
	for v := range c.refused {
		refused[v] = true
	}
	c.mu.Unlock()
	var out []source
	seen := map[string]bool{}
	for _, h := range hints {
		if m, ok := c.node.Member(h.Origin); ok && m.HTTP != "" && m.Alive() && m.Name != c.node.Name() {
			out = append(out, source{m.Name, m.HTTP, h.Version})
			seen[m.Name] = true
		}
	}
	for _, m := range c.node.Alive() {
		if m.Name == c.node.Name() || seen[m.Name] || m.HTTP == "" || m.ConfigVersion <= cur || refused[m.ConfigVersion] {
			continue
		}
		out = append(out, source{m.Name, m.HTTP, m.ConfigVersion})
	}
	slices.SortStableFunc(out, func(a, b source) int {
		if a.version != b.version {
			if a.version > b.version {
				return -1
			}
			return 1
		}
		return strings.Compare(a.name, b.name)
	})
	return out
}

// catchUp fetches and applies the newest version some member has, trying
// the members in turn; a failed fetch is retried at the next tick.
func (c *ConfigDist) catchUp() {
	for range 4 { // bounded: a newer push may arrive while applying
		srcs := c.sources()
		if len(srcs) == 0 {
			return
		}
		done := false
		for _, s := range srcs {
			select {
			case <-c.stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			doc, v, err := c.fetch(ctx, s.addr)
			cancel()
			if err != nil {
				c.log.Warn("fetching the cluster configuration", "from", s.name, "version", s.version, "err", err)
				continue
			}
			if c.applyFetched(doc, v, s.name) {
				done = true
				break
			}
		}
		if !done {
			return
		}
	}
}

// applyFetched applies a fetched version unless it is not newer or was
// refused before. It reports whether the version was dealt with
// (applied or refused).
func (c *ConfigDist) applyFetched(doc []byte, v uint64, from string) bool {
	c.applyMu.Lock()
	defer c.applyMu.Unlock()
	c.mu.Lock()
	_, refused := c.refused[v]
	cur := c.version
	hint, hinted := c.hints[v]
	c.mu.Unlock()
	if v <= cur || refused {
		return false
	}
	if hinted && hint.Digest != "" && hint.Digest != digest(doc) {
		// Two pushes took the same number; run the one announced.
		c.log.Warn("fetched configuration differs from the announced one", "version", v, "from", from)
		return false
	}
	note, err := c.opt.Apply(doc, v)
	if err != nil {
		c.refuse(v, err)
		c.log.Error("cluster configuration refused; keeping the running one", "version", v, "running", cur, "err", err)
		return true
	}
	if err := c.commit(doc, v, note); err != nil {
		c.log.Error("storing the cluster configuration", "version", v, "err", err)
		return false
	}
	c.log.Info("cluster configuration applied", "version", v, "from", from, "digest", digest(doc), "note", note)
	return true
}

// fetch gets a member's running document: GET http://ADDR/api/cluster/config.
func (c *ConfigDist) fetch(ctx context.Context, addr string) ([]byte, uint64, error) {
	u := "http://" + addr + ConfigPath
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, 0, fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(b)))
	}
	v, err := strconv.ParseUint(resp.Header.Get(ConfigVersionHeader), 10, 64)
	if err != nil || v == 0 {
		return nil, 0, fmt.Errorf("GET %s: bad %s %q", u, ConfigVersionHeader, resp.Header.Get(ConfigVersionHeader))
	}
	doc, err := io.ReadAll(io.LimitReader(resp.Body, MaxConfigSize+1))
	if err != nil {
		return nil, 0, fmt.Errorf("GET %s: %w", u, err)
	}
	if len(doc) > MaxConfigSize {
		return nil, 0, fmt.Errorf("GET %s: document larger than %d bytes", u, MaxConfigSize)
	}
	return doc, v, nil
}

// ServeDocument answers GET /api/cluster/config: the running document
// with its version in X-Hermod-Config-Version, or 404 when there is none.
func (c *ConfigDist) ServeDocument(w http.ResponseWriter, r *http.Request) {
	doc, v := c.Document()
	if v == 0 {
		http.Error(w, "no cluster configuration has been pushed", http.StatusNotFound)
		return
	}
	w.Header().Set(ConfigVersionHeader, strconv.FormatUint(v, 10))
	w.Header().Set("Content-Type", "application/toml")
	_, _ = w.Write(doc)
}

// ServeStatus answers GET /api/cluster/config/status with Status in JSON.
func (c *ConfigDist) ServeStatus(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(c.Status())
}

// Node states in a PushResult.
const (
	ConfigApplied    = "applied"
	ConfigRefused    = "refused"
	ConfigPending    = "pending"
	ConfigSuperseded = "superseded" // the node runs a newer version
	ConfigConflict   = "conflict"   // same version, another document
)

// NodeConfig is one node's answer to a push.
type NodeConfig struct {
	Name    string `json:"name"`
	Addr    string `json:"addr,omitempty"`
	State   string `json:"state"`
	Version uint64 `json:"version"` // the version it runs
	Note    string `json:"note,omitempty"`
	Error   string `json:"error,omitempty"` // refusal reason, or why it could not be asked
}

// PushResult is the outcome of a push on every node alive at the time.
type PushResult struct {
	Version uint64       `json:"version"`
	Digest  string       `json:"digest"`
	Nodes   []NodeConfig `json:"nodes"`
}

// Complete reports whether every node applied the version.
func (p PushResult) Complete() bool {
	for _, n := range p.Nodes {
		if n.State != ConfigApplied {
			return false
		}
	}
	return true
}

// PushWait pushes doc and waits until every alive member applied or
// refused it, or ctx ends (those left are "pending").
func (c *ConfigDist) PushWait(ctx context.Context, doc []byte) (PushResult, error) {
	v, err := c.Push(doc)
	if err != nil {
		return PushResult{}, err
	}
	return c.Wait(ctx, v, digest(doc)), nil
}

// Wait asks the alive members' admin APIs (GET
// /api/cluster/config/status, every 200 ms) until each runs version v
// with the given digest, refused v, or runs something newer; it stops
// when ctx ends, leaving the others "pending".
func (c *ConfigDist) Wait(ctx context.Context, v uint64, dig string) PushResult {
	res := PushResult{Version: v, Digest: dig}
	for _, m := range c.node.Alive() {
		res.Nodes = append(res.Nodes, NodeConfig{Name: m.Name, Addr: m.HTTP, State: ConfigPending})
	}
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		var wg sync.WaitGroup
		for i := range res.Nodes {
			n := &res.Nodes[i]
			if n.State != ConfigPending {
				continue
			}
			wg.Go(func() {
				var st ConfigStatus
				var err error
				if n.Name == c.node.Name() {
					st = c.Status()
				} else {
					st, err = c.fetchStatus(ctx, n.Addr)
				}
				if err != nil {
					n.Error = err.Error()
					return
				}
				n.Error, n.Version, n.Note = "", st.Version, st.Note
				switch {
				case st.Version == v && st.Digest == dig:
					n.State = ConfigApplied
				case st.Version == v:
					n.State = ConfigConflict
				case st.Version > v:
					n.State = ConfigSuperseded
				case st.Refused != nil && st.Refused.Version == v:
					n.State, n.Error = ConfigRefused, st.Refused.Error
				}
			})
		}
		wg.Wait()
		if !slices.ContainsFunc(res.Nodes, func(n NodeConfig) bool { return n.State == ConfigPending }) {
			return res
		}
		select {
		case <-ctx.Done():
			return res
		case <-t.C:
		}
	}
}

func (c *ConfigDist) fetchStatus(ctx context.Context, addr string) (ConfigStatus, error) {
	var st ConfigStatus
	if addr == "" {
		return st, errors.New("no admin address")
	}
	u := "http://" + addr + ConfigStatusPath
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return st, err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return st, fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&st); err != nil {
		return st, fmt.Errorf("GET %s: %w", u, err)
	}
	return st, nil
}

// ConfigDigest identifies a document (sha256, first 16 hex digits).
func ConfigDigest(doc []byte) string { return digest(doc) }

func digest(doc []byte) string {
	h := sha256.Sum256(doc)
	return hex.EncodeToString(h[:8])
}

// LoadMasterConfig reads the stored master document and its version from
// dir (nil, 0 and no error when none was stored).
func LoadMasterConfig(dir string) ([]byte, uint64, error) {
	path := filepath.Join(dir, masterFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, nil
	} else if err != nil {
		return nil, 0, fmt.Errorf("cluster: %w", err)
	}
	line, rest, ok := bytes.Cut(b, []byte("\n"))
	if !ok || !bytes.HasPrefix(line, []byte(masterHeader)) {
		return nil, 0, fmt.Errorf("cluster: %s: no version header", path)
	}
	v, err := strconv.ParseUint(string(bytes.TrimPrefix(line, []byte(masterHeader))), 10, 64)
	if err != nil || v == 0 {
		return nil, 0, fmt.Errorf("cluster: %s: bad version header %q", path, line)
	}
	return rest, v, nil
}

// WriteMasterConfig stores doc as version v in dir atomically: a
// temporary file is written and fsynced, renamed over the old one, and
// the directory fsynced. The file is the document preceded by one
// comment line with the version, so it stays valid TOML.
func WriteMasterConfig(dir string, doc []byte, v uint64) error {
	path := filepath.Join(dir, masterFile)
	tmp, err := os.CreateTemp(dir, masterFile+".tmp*")
	if err != nil {
		return fmt.Errorf("cluster: storing the configuration: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	w := bufio.NewWriter(tmp)
	fmt.Fprintf(w, "%s%d\n", masterHeader, v)
	w.Write(doc)
	err = w.Flush()
	if err == nil {
		err = tmp.Sync()
	}
	if e := tmp.Close(); err == nil {
		err = e
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("cluster: storing the configuration: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
