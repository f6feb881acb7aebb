package main

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hermod-mta/hermod/cluster"
	"github.com/hermod-mta/hermod/engine"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// localConfig is a node's own file as LoadConfig returns it.
func localConfig(t *testing.T, name, spoolDir string) Config {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".toml")
	err := os.WriteFile(path, []byte(`
[server]
hostname = "`+name+`.example.net"
[smtp]
listen = ["127.0.0.7:2525"]
relay_networks = ["10.9.0.0/16"]
[spool]
dir = "`+spoolDir+`"
[http]
listen = "127.0.0.7:8025"
[delivery]
max_connections = 77
[log]
delivery_log = "off"
[cluster]
bind = "127.0.0.7:7946"
node_name = "`+name+`"
join = ["127.0.0.8:7946"]
`), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestMergeMaster(t *testing.T) {
	local := localConfig(t, "n1", "/var/lib/hermod/n1")
	for _, tc := range []struct {
		name    string
		doc     string
		check   func(t *testing.T, c Config)
		wantErr []string // substrings of the error, all of them
	}{
		{
			name: "empty master: defaults plus node-local keys",
			doc:  "",
			check: func(t *testing.T, c Config) {
				def := DefaultConfig()
				if c.Delivery.MaxConnections != def.Delivery.MaxConnections {
					t.Errorf("delivery.max_connections %d: the local file's value must not count", c.Delivery.MaxConnections)
				}
				if !reflect.DeepEqual(c.SMTP.RelayNetworks, def.SMTP.RelayNetworks) {
					t.Errorf("relay_networks %v", c.SMTP.RelayNetworks)
				}
				if c.Server.Hostname != "n1.example.net" || c.SMTP.ServerConfig.Hostname != "n1.example.net" ||
					c.Delivery.Hostname != "n1.example.net" {
					t.Errorf("hostnames %q %q %q", c.Server.Hostname, c.SMTP.ServerConfig.Hostname, c.Delivery.Hostname)
				}
				if c.Spool.Dir != "/var/lib/hermod/n1" || c.Spool.NodeID != uint16(c.Cluster.NodeID) || c.HTTP.Listen != "127.0.0.7:8025" {
					t.Errorf("spool %q id %d http %q", c.Spool.Dir, c.Spool.NodeID, c.HTTP.Listen)
				}
				if c.Cluster.Bind != "127.0.0.7:7946" || c.Cluster.NodeName != "n1" || c.Cluster.ReplicationListen != "127.0.0.7:7947" ||
					!reflect.DeepEqual(c.Cluster.Join, []string{"127.0.0.8:7946"}) || c.Log.DeliveryLog != "off" {
					t.Errorf("cluster %+v, delivery log %q", c.Cluster, c.Log.DeliveryLog)
				}
				if !reflect.DeepEqual(c.SMTP.Listen, []string{"127.0.0.7:2525"}) {
					t.Errorf("listen %v", c.SMTP.Listen)
				}
			},
		},
		{
			name: "master tables and this node's overrides merge key by key",
			doc: `
[smtp]
relay_networks = ["192.0.2.0/24"]
max_hops = 30
[delivery]
max_connections = 500
max_connections_per_domain = 5
retry = ["1m", "5m"]
[log]
level = "debug"
[cluster]
replicas = 2
domain_limits = { "gmail.com" = 60, "yahoo.com" = 10 }

[node.n1.delivery]
max_connections_per_domain = 9
retry = ["2m"]
[node.n1.cluster.domain_limits]
"gmail.com" = 30
[node.n2.delivery]
max_connections_per_domain = 100
max_connections = 1
`,
			check: func(t *testing.T, c Config) {
				if c.Delivery.MaxConnections != 500 || c.Delivery.MaxConnectionsPerDomain != 9 {
					t.Errorf("delivery %d / %d, want 500 / 9", c.Delivery.MaxConnections, c.Delivery.MaxConnectionsPerDomain)
				}
				if !reflect.DeepEqual(c.Delivery.Retry, []time.Duration{2 * time.Minute}) {
					t.Errorf("retry %v: a list is replaced whole", c.Delivery.Retry)
				}
				if !reflect.DeepEqual(c.SMTP.RelayNetworks, []string{"192.0.2.0/24"}) || c.SMTP.MaxHops != 30 || c.Log.Level != "debug" {
					t.Errorf("smtp %v %d, log %q", c.SMTP.RelayNetworks, c.SMTP.MaxHops, c.Log.Level)
				}
				if !reflect.DeepEqual(c.Cluster.DomainLimits, map[string]int{"gmail.com": 30, "yahoo.com": 10}) || c.Cluster.ReplicaCount() != 2 {
					t.Errorf("cluster limits %v replicas %d", c.Cluster.DomainLimits, c.Cluster.ReplicaCount())
				}
			},
		},
		{
			name:    "node-local keys are refused, at the top and per node",
			doc:     "[spool]\ndir = \"/x\"\n[smtp]\nlisten = [\"0.0.0.0:25\"]\n[node.n2.cluster]\nbind = \"10.0.0.2:7946\"\n[node.n1.http]\nlisten = \"off\"\n",
			wantErr: []string{"node-local key(s) node.n1.http, node.n2.cluster.bind, smtp.listen, spool:"},
		},
		{
			name:    "unknown keys are refused by name, in other nodes' tables too",
			doc:     "[delivery]\nmax_conections = 5\n[node.n3.dns]\nresolverz = [\"1.1.1.1:53\"]\n[bogus]\nx = 1\n",
			wantErr: []string{"unknown key(s): bogus, bogus.x, delivery.max_conections, node.n3.dns.resolverz"},
		},
		{
			name:    "a type error in another node's table is refused",
			doc:     "[node.n2.delivery]\nmax_connections = \"many\"\n",
			wantErr: []string{"[node.n2]", "max_connections"},
		},
		{
			name:    "syntax error",
			doc:     "[delivery\n",
			wantErr: []string{"master config:"},
		},
		{
			name:    "the merged configuration is validated",
			doc:     "[smtp]\nrelay_networks = [\"not-a-cidr\"]\n[node.n1.log]\nlevel = \"loud\"\n",
			wantErr: []string{"master config for node n1", "smtp.relay_networks", "log.level"},
		},
		{
			name: "another node's invalid value is not this node's problem",
			doc:  "[node.n2.log]\nlevel = \"loud\"\n",
			check: func(t *testing.T, c Config) {
				if c.Log.Level != "info" {
					t.Errorf("log level %q", c.Log.Level)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := mergeMaster([]byte(tc.doc), "n1", local)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatal("accepted")
				}
				for _, s := range tc.wantErr {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q lacks %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

func TestLoadStoredMaster(t *testing.T) {
	spoolDir := t.TempDir()
	local := localConfig(t, "n1", spoolDir)
	// Nothing stored: the local file.
	cfg, v, err := loadStoredMaster(local)
	if err != nil || v != 0 || cfg.Delivery.MaxConnections != 77 {
		t.Fatalf("nothing stored: v%d %v", v, err)
	}
	dir := masterStateDir(local)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := cluster.WriteMasterConfig(dir, []byte("[delivery]\nmax_connections = 3\n"), 4); err != nil {
		t.Fatal(err)
	}
	cfg, v, err = loadStoredMaster(local)
	if err != nil || v != 4 || cfg.Delivery.MaxConnections != 3 || cfg.Spool.Dir != spoolDir {
		t.Fatalf("stored v4: v%d max_connections %d %v", v, cfg.Delivery.MaxConnections, err)
	}
	// A stored document that no longer fits: the local file, and why.
	if err := cluster.WriteMasterConfig(dir, []byte("[delivery]\nremoved_key = 3\n"), 5); err != nil {
		t.Fatal(err)
	}
	cfg, v, err = loadStoredMaster(local)
	if err == nil || !strings.Contains(err.Error(), "version 5") || !strings.Contains(err.Error(), "delivery.removed_key") ||
		v != 0 || cfg.Delivery.MaxConnections != 77 {
		t.Fatalf("unfit v5: v%d %v", v, err)
	}
}

// testDaemon is a daemonState with what applyMaster touches.
func testDaemon(t *testing.T) *daemonState {
	t.Helper()
	cfg := localConfig(t, "n1", t.TempDir())
	st, err := spool.Open(cfg.Spool, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	recv, err := engine.NewReceiver(cfg.SMTP.RelayConfig, engine.ReceiverOptions{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := netio.NewServer(cfg.SMTP.ServerConfig, recv, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := &daemonState{log: slog.New(slog.DiscardHandler), level: new(slog.LevelVar), receiver: recv, store: st}
	d.cfg.Store(&cfg)
	d.server.Store(srv)
	return d
}

func TestApplyMaster(t *testing.T) {
	d := testDaemon(t)
	boot := *d.cfg.Load()
	for _, tc := range []struct {
		name      string
		doc       string
		wantErr   string
		wantNote  string
		wantLevel slog.Level
		wantHops  int
	}{
		{name: "live keys only", doc: "[log]\nlevel = \"debug\"\n[smtp]\nmax_hops = 7\n[delivery]\nmax_connections = 77\n",
			wantLevel: slog.LevelDebug, wantHops: 7},
		{name: "restart needed", doc: "[log]\nlevel = \"warn\"\n[smtp]\nmax_hops = 8\n[delivery]\nmax_connections = 5\n[cluster]\nreplicas = 0\n",
			wantNote: "takes effect at the next restart: delivery, cluster", wantLevel: slog.LevelWarn, wantHops: 8},
		{name: "back to the boot values", doc: "[log]\nlevel = \"warn\"\n[smtp]\nmax_hops = 8\n[delivery]\nmax_connections = 77\n",
			wantLevel: slog.LevelWarn, wantHops: 8},
		{name: "invalid: nothing changes", doc: "[log]\nlevel = \"error\"\n[smtp]\nmax_hops = -1\n",
			wantErr: "smtp.max_hops", wantLevel: slog.LevelWarn, wantHops: 8},
		{name: "missing certificate: nothing changes", doc: "[smtp]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
			wantErr: "tls_cert", wantLevel: slog.LevelWarn, wantHops: 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			note, err := d.applyMaster(boot, []byte(tc.doc), 1)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if note != tc.wantNote {
				t.Errorf("note %q, want %q", note, tc.wantNote)
			}
			if d.level.Level() != tc.wantLevel || d.cfg.Load().SMTP.MaxHops != tc.wantHops {
				t.Errorf("running: level %v, max_hops %d", d.level.Level(), d.cfg.Load().SMTP.MaxHops)
			}
			if d.cfg.Load().Cluster.NodeName != "n1" || d.cfg.Load().SMTP.Listen[0] != "127.0.0.7:2525" {
				t.Errorf("node-local keys lost: %+v", d.cfg.Load().Cluster)
			}
		})
	}
}

// TestConfigRoutes pushes through the admin API of a node that is not
// gossiping (the announcement fails; the push stands).
func TestConfigRoutes(t *testing.T) {
	d := testDaemon(t)
	cfg := *d.cfg.Load()
	node, err := cluster.NewNode(cfg.Cluster, cluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cd, err := d.newConfigDist(node, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	configRoutes(mux, func() *cluster.ConfigDist { return cd })
	srv := httptest.NewServer(mux)
	defer srv.Close()
	admin := srv.Listener.Addr().String()

	if _, err := postConfig(admin, []byte("[smtp]\nmax_hops = -1\n"), time.Second); err == nil ||
		!strings.Contains(err.Error(), "422") || !strings.Contains(err.Error(), "smtp.max_hops") {
		t.Fatalf("refused push: %v", err)
	}
	doc := []byte("[smtp]\nmax_hops = 12\n")
	res, err := postConfig(admin, doc, time.Second)
	if err != nil || res.Version != 1 || res.Digest != cluster.ConfigDigest(doc) {
		t.Fatalf("push: %+v %v", res, err)
	}
	if d.cfg.Load().SMTP.MaxHops != 12 {
		t.Errorf("not applied: max_hops %d", d.cfg.Load().SMTP.MaxHops)
	}
	resp, err := http.Get(srv.URL + cluster.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get(cluster.ConfigVersionHeader) != "1" {
		t.Errorf("GET config: %s version %q", resp.Status, resp.Header.Get(cluster.ConfigVersionHeader))
	}
	var st cluster.ConfigStatus
	if err := getJSON(srv.URL+cluster.ConfigStatusPath, &st); err != nil || st.Version != 1 || st.Node != "n1" {
		t.Errorf("status %+v %v", st, err)
	}

	// Not clustered: 404 with the reason.
	mux2 := http.NewServeMux()
	configRoutes(mux2, func() *cluster.ConfigDist { return nil })
	srv2 := httptest.NewServer(mux2)
	defer srv2.Close()
	if _, err := postConfig(srv2.Listener.Addr().String(), doc, time.Second); err == nil || !strings.Contains(err.Error(), "not part of a cluster") {
		t.Errorf("not clustered: %v", err)
	}
}

func TestShadowedLocalKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "n1.toml")
	err := os.WriteFile(path, []byte(`
[server]
hostname = "n1"
[smtp]
listen = ["127.0.0.7:25"]
max_hops = 9
[spool]
dir = "/s"
compression = "none"
[log]
level = "debug"
delivery_log = "off"
[cluster]
bind = "127.0.0.7:7946"
probe_interval = "100ms"
domain_limits = { "gmail.com" = 3 }
`), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	got := shadowedLocalKeys(path)
	want := []string{`cluster.domain_limits."gmail.com"`, "cluster.probe_interval", "log.level", "smtp.max_hops"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	if got := shadowedLocalKeys(""); got != nil {
		t.Errorf("no file: %q", got)
	}
}
