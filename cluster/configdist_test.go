package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// confNode is a gossip Node with a ConfigDist behind a real admin API
// (httptest on loopback).
type confNode struct {
	name string
	dir  string
	node *Node
	cd   *ConfigDist
	srv  *httptest.Server

	mu      sync.Mutex
	applied []string // documents applied, in order
	refuse  string   // Apply refuses documents containing this
}

func (c *confNode) apply(doc []byte, v uint64) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refuse != "" && bytes.Contains(doc, []byte(c.refuse)) {
		return "", fmt.Errorf("%s: key %q is not allowed here", c.name, c.refuse)
	}
	c.applied = append(c.applied, fmt.Sprintf("%d:%s", v, doc))
	return "", nil
}

func (c *confNode) last() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.applied) == 0 {
		return ""
	}
	return c.applied[len(c.applied)-1]
}

func startConfNode(t *testing.T, name, dir string, join []string, refuse string) *confNode {
	t.Helper()
	c := &confNode{name: name, dir: dir, refuse: refuse}
	mux := http.NewServeMux()
	// The handlers read c.cd, set before the node starts gossiping.
	mux.HandleFunc("GET "+ConfigPath, func(w http.ResponseWriter, r *http.Request) { c.cd.ServeDocument(w, r) })
	mux.HandleFunc("GET "+ConfigStatusPath, func(w http.ResponseWriter, r *http.Request) { c.cd.ServeStatus(w, r) })
	c.srv = httptest.NewServer(mux)
	t.Cleanup(c.srv.Close)

	bind := fmt.Sprintf("127.0.0.1:%d", freePort(t, "127.0.0.1"))
	cfg := Config{Bind: bind, Join: join, NodeName: name, ProbeInterval: 100 * time.Millisecond}
	cfg.EnsureDefaults(name)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", name)
	node, err := NewNode(cfg, Options{Logger: log, HTTP: c.srv.Listener.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	c.node = node
	c.cd, err = NewConfigDist(node, ConfigDistOptions{Logger: log, Dir: filepath.Join(dir, "cluster"), Apply: c.apply,
		RetryInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Start(); err != nil {
		t.Fatal(err)
	}
	c.cd.Start()
	return c
}

func (c *confNode) close() {
	c.cd.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = c.node.Close(ctx)
}

func TestConfigDistPush(t *testing.T) {
	base := t.TempDir()
	n1 := startConfNode(t, "n1", filepath.Join(base, "n1"), nil, "")
	defer n1.close()
	join := []string{n1.node.Config().Bind}
	n2 := startConfNode(t, "n2", filepath.Join(base, "n2"), join, "")
	defer n2.close()
	n3 := startConfNode(t, "n3", filepath.Join(base, "n3"), join, "forbidden_on_n3")
	defer n3.close()
	nodes := []*confNode{n1, n2, n3}
	waitFor(t, "3 alive members everywhere", 10*time.Second, func() bool {
		for _, n := range nodes {
			if len(n.node.Alive()) != 3 {
				return false
			}
		}
		return true
	})

	// 1. A push from n1 reaches every node.
	docA := []byte("[delivery]\nmax_connections = 10\n")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	res, err := n1.cd.PushWait(ctx, docA)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 1 || !res.Complete() || len(res.Nodes) != 3 {
		t.Fatalf("push A: %+v", res)
	}
	for _, n := range nodes {
		if got := n.last(); got != "1:"+string(docA) {
			t.Errorf("%s applied %q", n.name, got)
		}
		if st := n.cd.Status(); st.Version != 1 || st.Digest != ConfigDigest(docA) || st.Refused != nil {
			t.Errorf("%s status %+v", n.name, st)
		}
	}

	// 2. A push from n2 that n3 refuses: n3 reports why and keeps version 1.
	docB := []byte("[smtp]\nforbidden_on_n3 = true\n")
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	res, err = n2.cd.PushWait(ctx, docB)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 2 || res.Complete() {
		t.Fatalf("push B: %+v", res)
	}
	for _, nr := range res.Nodes {
		want := ConfigApplied
		if nr.Name == "n3" {
			want = ConfigRefused
		}
		if nr.State != want {
			t.Errorf("push B: %s is %s (%s), want %s", nr.Name, nr.State, nr.Error, want)
		}
		if nr.Name == "n3" && !strings.Contains(nr.Error, `key "forbidden_on_n3" is not allowed`) {
			t.Errorf("push B: n3's reason %q", nr.Error)
		}
	}
	if st := n3.cd.Status(); st.Version != 1 || st.Refused == nil || st.Refused.Version != 2 {
		t.Errorf("n3 status after refusing: %+v", st)
	}
	if m, _ := n1.node.Member("n3"); m.ConfigVersion != 1 {
		t.Errorf("n3 advertises version %d, want 1", m.ConfigVersion)
	}
	if got := n3.last(); got != "1:"+string(docA) {
		t.Errorf("n3 runs %q", got)
	}

	// 3. A push the pushing node itself refuses changes nothing anywhere.
	if _, err := n3.cd.Push([]byte("forbidden_on_n3 = 1\n")); !errors.Is(err, ErrConfigRefused) ||
		!strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("local refusal: %v", err)
	}
	if st := n3.cd.Status(); st.Version != 1 {
		t.Errorf("n3 version after local refusal: %d", st.Version)
	}

	// 4. A node started later fetches the newest version from the others
	// (no announcement reaches it: it learns the version from the tags).
	n4 := startConfNode(t, "n4", filepath.Join(base, "n4"), join, "")
	defer n4.close()
	waitFor(t, "n4 to fetch version 2", 10*time.Second, func() bool { return n4.cd.Status().Version == 2 })
	if got := n4.last(); got != "2:"+string(docB) {
		t.Errorf("n4 applied %q", got)
	}
	waitFor(t, "n1 to see n4 advertise version 2", 10*time.Second, func() bool {
		m, ok := n1.node.Member("n4")
		return ok && m.ConfigVersion == 2
	})

	// 5. The next push from a node that runs an older version still
	// supersedes every version in the cluster.
	docC := []byte("# C\n")
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	res, err = n3.cd.PushWait(ctx, docC)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 3 || !res.Complete() || len(res.Nodes) != 4 {
		t.Fatalf("push C: %+v", res)
	}

	// Stored on disk with its version, served with the version header.
	for _, n := range []*confNode{n1, n2, n3, n4} {
		doc, v, err := LoadMasterConfig(filepath.Join(n.dir, "cluster"))
		if err != nil || v != 3 || !bytes.Equal(doc, docC) {
			t.Errorf("%s stored v%d %q %v", n.name, v, doc, err)
		}
	}
	resp, err := http.Get(n2.srv.URL + ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get(ConfigVersionHeader) != "3" {
		t.Errorf("served version %q", resp.Header.Get(ConfigVersionHeader))
	}
}

func TestConfigDistRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Bind: "127.0.0.1:1", NodeName: "r1"}
	cfg.EnsureDefaults("r1")
	newDist := func(storedErr error) *ConfigDist {
		node, err := NewNode(cfg, Options{})
		if err != nil {
			t.Fatal(err)
		}
		cd, err := NewConfigDist(node, ConfigDistOptions{Dir: dir, StoredErr: storedErr,
			Apply: func([]byte, uint64) (string, error) { return "", nil }})
		if err != nil {
			t.Fatal(err)
		}
		return cd
	}
	if st := newDist(nil).Status(); st.Version != 0 || st.Refused != nil {
		t.Fatalf("empty state: %+v", st)
	}
	if err := WriteMasterConfig(dir, []byte("a = 1\n"), 7); err != nil {
		t.Fatal(err)
	}
	cd := newDist(nil)
	if doc, v := cd.Document(); v != 7 || string(doc) != "a = 1\n" {
		t.Fatalf("restart: v%d %q", v, doc)
	}
	if cd.node.tags()[tagConfig] != "7" {
		t.Errorf("tag cv = %q", cd.node.tags()[tagConfig])
	}
	// The daemon could not run the stored document: it advertises 0 and
	// reports version 7 as refused (so it does not fetch it again).
	cd = newDist(errors.New("smtp.relay_networks: bad"))
	st := cd.Status()
	if st.Version != 0 || st.Refused == nil || st.Refused.Version != 7 || !strings.Contains(st.Refused.Error, "relay_networks") {
		t.Errorf("stored but refused: %+v", st)
	}
	if _, v := cd.Document(); v != 0 {
		t.Errorf("serves v%d", v)
	}
	// A push from there takes version 8.
	// (The node is not started: the announcement fails, the push stands.)
	if v, err := cd.Push([]byte("b = 2\n")); err != nil || v != 8 {
		t.Fatalf("push: v%d %v", v, err)
	}
	if doc, sv, _ := LoadMasterConfig(dir); sv != 8 || string(doc) != "b = 2\n" {
		t.Errorf("after push: v%d %q", sv, doc)
	}
}

func TestMasterConfigFile(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name    string
		content string
		wantV   uint64
		wantErr string
	}{
		{"valid", masterHeader + "12\n[log]\nlevel = \"debug\"\n", 12, ""},
		{"empty doc", masterHeader + "1\n", 1, ""},
		{"no header", "[log]\n", 0, "no version header"},
		{"bad version", masterHeader + "x\n", 0, "bad version"},
		{"zero version", masterHeader + "0\n", 0, "bad version"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(filepath.Join(dir, masterFile), []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, v, err := LoadMasterConfig(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || v != tc.wantV {
				t.Fatalf("v%d %v", v, err)
			}
		})
	}
	doc := []byte("[delivery]\nretry = [\"1m\"]\n")
	if err := WriteMasterConfig(dir, doc, 3); err != nil {
		t.Fatal(err)
	}
	got, v, err := LoadMasterConfig(dir)
	if err != nil || v != 3 || !bytes.Equal(got, doc) {
		t.Fatalf("round trip: v%d %q %v", v, got, err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("temporary files left: %v", ents)
	}
}
