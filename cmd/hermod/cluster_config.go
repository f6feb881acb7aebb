package main

// The cluster's master configuration (issue 6, "single-point
// configuration"), the daemon's side: merging the master document with
// this node's own file, applying it live, its admin API routes and
// `hermod cluster push-config`. Distribution is cluster.ConfigDist.
//
// The master document has the tables of a node's file plus optional
// [node.NAME] tables. A node runs:
//
//	defaults ← master tables ← [node.<its cluster.node_name>] ← node-local keys of its own file
//
// Tables merge key by key (a key in [node.n1.delivery] replaces that key
// of [delivery] on n1; a map such as cluster.domain_limits merges entry by
// entry; a list is replaced whole). Node-local keys (nodeLocalKeys) always
// come from the node's own file: the master may not set them, at the top
// or in a [node.NAME] table. Every other key of the node's own file is
// ignored while a master version is in force. The document decodes
// strictly (unknown keys, in any [node.NAME] table too, are refused by
// name) and the merged configuration must pass Validate.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/hermod-mta/hermod/cluster"
)

// nodeLocalKeys are the keys (or whole tables) that identify a node or
// name its own files and addresses. They always come from the node's own
// configuration file; a master document setting one is refused.
func nodeLocalKeys() []string {
	return []string{
		"server.hostname",
		"smtp.listen",
		"spool", // the whole table: the store's directory and tuning
		"http",  // the whole table: the admin API address
		"log.delivery_log",
		"cluster.bind", "cluster.advertise", "cluster.join", "cluster.node_name", "cluster.node_id",
		"cluster.secret_key", "cluster.replication_listen",
	}
}

// copyNodeLocal sets dst's node-local keys from src.
func copyNodeLocal(dst *Config, src Config) {
	dst.Server.Hostname = src.Server.Hostname
	dst.SMTP.Listen = src.SMTP.Listen
	dst.Spool = src.Spool
	dst.HTTP = src.HTTP
	dst.Log.DeliveryLog = src.Log.DeliveryLog
	c, s := &dst.Cluster, src.Cluster
	c.Bind, c.Advertise, c.Join, c.NodeName, c.NodeID = s.Bind, s.Advertise, s.Join, s.NodeName, s.NodeID
	c.SecretKey, c.ReplicationListen = s.SecretKey, s.ReplicationListen
}

// masterDoc is a master configuration document.
type masterDoc struct {
	Config
	Node map[string]toml.Primitive `toml:"node"`
}

// mergeMaster builds the configuration node runs from the master document
// and local, the node's own configuration (node-local keys are taken from
// it). The result has its defaults and is valid, or the error says every
// reason at once where it can.
func mergeMaster(doc []byte, node string, local Config) (Config, error) {
	var m masterDoc
	md, err := toml.Decode(string(doc), &m)
	if err != nil {
		return Config{}, fmt.Errorf("master config: %w", err)
	}
	var errs []error
	var bad []string
	names := make([]string, 0, len(m.Node))
	for name := range m.Node {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, k := range nodeLocalKeys() {
		path := strings.Split(k, ".")
		if md.IsDefined(path...) {
			bad = append(bad, k)
		}
		for _, name := range names {
			if md.IsDefined(append([]string{"node", name}, path...)...) {
				bad = append(bad, "node."+name+"."+k)
			}
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		errs = append(errs, fmt.Errorf("master config sets node-local key(s) %s: they come from each node's own file",
			strings.Join(bad, ", ")))
	}
	// Every [node.NAME] table is decoded (into a scratch configuration
	// for the other nodes), so a mistake for any node is refused on all.
	for _, name := range names {
		dst := new(Config)
		if name == node {
			dst = &m.Config
		}
		if err := md.PrimitiveDecode(m.Node[name], dst); err != nil {
			errs = append(errs, fmt.Errorf("master config [node.%s]: %w", name, err))
		}
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		sort.Strings(keys)
		errs = append(errs, fmt.Errorf("master config: unknown key(s): %s", strings.Join(keys, ", ")))
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	cfg := m.Config
	copyNodeLocal(&cfg, local)
	// Keys derived from others are derived again from the merged values.
	cfg.SMTP.ServerConfig.Hostname = ""
	cfg.Spool.NodeID = 0
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return Config{}, fmt.Errorf("master config for node %s:\n%w", node, err)
	}
	return cfg, nil
}

// masterStateDir is where a node keeps the master document (with the
// rest of its cluster state).
func masterStateDir(cfg Config) string { return filepath.Join(cfg.Spool.Dir, "cluster") }

// loadStoredMaster returns the configuration a node starts with: local
// (its own file, as LoadConfig returned it) merged with the master
// document it stored last, and that document's version. Without a stored
// document it returns local and 0. When the stored document no longer
// fits (the local file changed, or a key was removed from Hermod) it
// returns local, 0 and the reason: the node runs its own file and reports
// the version as refused.
func loadStoredMaster(local Config) (Config, uint64, error) {
	if !local.Cluster.Enabled() {
		return local, 0, nil
	}
	doc, v, err := cluster.LoadMasterConfig(masterStateDir(local))
	if err != nil || v == 0 {
		return local, 0, err
	}
	cfg, err := mergeMaster(doc, local.Cluster.NodeName, local)
	if err != nil {
		return local, 0, fmt.Errorf("stored cluster configuration version %d: %w", v, err)
	}
	return cfg, v, nil
}

// applyMaster is ConfigDist's Apply: it merges doc for this node and
// applies it the way a SIGHUP reload does (relay policy, TLS certificate
// and log level live). The note names the sections that differ from boot,
// the configuration the process started with, and so take effect only at
// the next restart (when loadStoredMaster applies them), and the keys of
// the local file the master replaces. An invalid document changes
// nothing.
func (d *daemonState) applyMaster(boot Config, doc []byte, version uint64) (string, error) {
	old := d.cfg.Load()
	if old == nil || d.receiver == nil || d.server.Load() == nil {
		return "", errors.New("this node is still starting")
	}
	cfg, err := mergeMaster(doc, old.Cluster.NodeName, *old)
	if err != nil {
		return "", err
	}
	tlsCfg, err := loadTLS(cfg.SMTP.ServerConfig)
	if err != nil {
		return "", err
	}
	if err := d.receiver.SetPolicy(cfg.SMTP.RelayConfig); err != nil {
		return "", err
	}
	lv, _ := parseLevel(cfg.Log.Level)
	d.level.Set(lv)
	d.server.Load().SetTLSConfig(tlsCfg)
	d.applyClusterLive(cfg)
	restart := restartSections(boot, cfg)
	d.cfg.Store(&cfg)
	var notes []string
	if len(restart) > 0 {
		notes = append(notes, "takes effect at the next restart: "+strings.Join(restart, ", "))
		d.log.Warn("cluster configuration: some changes take effect at the next restart", "version", version, "sections", restart)
	}
	if ign := shadowedLocalKeys(d.cfgPath); len(ign) > 0 {
		d.log.Warn("cluster configuration: keys of the local file are ignored (only node-local keys are read from it)",
			"version", version, "keys", ign)
		if len(ign) > 8 {
			ign = append(ign[:8:8], fmt.Sprintf("and %d more", len(ign)-8))
		}
		notes = append(notes, "ignored in the local file: "+strings.Join(ign, ", "))
	}
	note := strings.Join(notes, "; ")
	d.log.Info("cluster configuration applied", "version", version, "log_level", cfg.Log.Level,
		"relay_networks", cfg.SMTP.RelayNetworks, "relay_domains", cfg.SMTP.RelayDomains, "starttls", tlsCfg != nil)
	return note, nil
}

// shadowedLocalKeys lists the keys a node's own file (path) sets that a
// master configuration replaces: all but the node-local ones.
func shadowedLocalKeys(path string) []string {
	if path == "" {
		return nil
	}
	var c Config
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		return nil
	}
	var out []string
	for _, k := range md.Keys() {
		if md.Type(k...) == "Hash" || isNodeLocal(k.String()) {
			continue
		}
		out = append(out, k.String())
	}
	sort.Strings(out)
	return out
}

// isNodeLocal reports whether the dotted key is, or is inside, a
// node-local key.
func isNodeLocal(key string) bool {
	for _, k := range nodeLocalKeys() {
		if key == k || strings.HasPrefix(key, k+".") {
			return true
		}
	}
	return false
}

// restartSections names the parts of the configuration that differ
// between old and cfg and are not applied live.
func restartSections(old, cfg Config) []string {
	oldSrv, newSrv := old.SMTP.ServerConfig, cfg.SMTP.ServerConfig
	oldSrv.TLSCert, oldSrv.TLSKey, newSrv.TLSCert, newSrv.TLSKey = "", "", "", ""
	// Fields that are not configuration (functions, injected objects)
	// would never compare equal.
	for _, c := range []*Config{&old, &cfg} {
		c.DNS.Now = nil
		c.Spool.FS, c.Spool.Clock = nil, nil
		c.Delivery.TLSConfig, c.Delivery.Logger = nil, nil
		c.Cluster.DomainLimits, c.Cluster.DomainRates, c.Cluster.SiteLimits = nil, nil, nil // applied live
	}
	var out []string
	for _, p := range []struct {
		name     string
		old, new any
	}{
		{"server", old.Server, cfg.Server}, {"smtp", oldSrv, newSrv}, {"spool", old.Spool, cfg.Spool},
		{"dns", old.DNS, cfg.DNS}, {"delivery", old.Delivery, cfg.Delivery}, {"http", old.HTTP, cfg.HTTP},
		{"log.format", old.Log.Format, cfg.Log.Format}, {"log.delivery_log", old.Log.DeliveryLog, cfg.Log.DeliveryLog},
		{"cluster", old.Cluster, cfg.Cluster},
	} {
		if !reflect.DeepEqual(p.old, p.new) {
			out = append(out, p.name)
		}
	}
	return out
}

// newConfigDist prepares the distribution of the master configuration on
// node; cfg is the configuration the daemon started with, storedErr
// loadStoredMaster's error at startup. Call it before the node starts,
// and Start the result once the SMTP server exists.
func (d *daemonState) newConfigDist(node *cluster.Node, cfg Config, storedErr error) (*cluster.ConfigDist, error) {
	return cluster.NewConfigDist(node, cluster.ConfigDistOptions{
		Logger: d.log.With("component", "cluster-config"),
		Dir:    masterStateDir(cfg),
		Apply: func(doc []byte, version uint64) (string, error) {
			return d.applyMaster(cfg, doc, version)
		},
		StoredErr: storedErr,
	})
}

// configRoutes adds the master configuration's admin API; cd returns the
// node's ConfigDist (nil when not clustered).
//
//	GET  /api/cluster/config         the running master document (X-Hermod-Config-Version)
//	GET  /api/cluster/config/status  cluster.ConfigStatus
//	POST /api/cluster/config[?wait=10s]
//	                                 push the body; answers cluster.PushResult (200),
//	                                 or 422 with the reason this node refused it
func configRoutes(mux *http.ServeMux, cd func() *cluster.ConfigDist) {
	get := func(w http.ResponseWriter) *cluster.ConfigDist {
		c := cd()
		if c == nil {
			http.Error(w, "this node is not part of a cluster ([cluster] bind is not set)", http.StatusNotFound)
		}
		return c
	}
	mux.HandleFunc("GET "+cluster.ConfigPath, func(w http.ResponseWriter, r *http.Request) {
		if c := get(w); c != nil {
			c.ServeDocument(w, r)
		}
	})
	mux.HandleFunc("GET "+cluster.ConfigStatusPath, func(w http.ResponseWriter, r *http.Request) {
		if c := get(w); c != nil {
			c.ServeStatus(w, r)
		}
	})
	mux.HandleFunc("POST "+cluster.ConfigPath, func(w http.ResponseWriter, r *http.Request) {
		c := get(w)
		if c == nil {
			return
		}
		wait := 10 * time.Second
		if s := r.URL.Query().Get("wait"); s != "" {
			v, err := time.ParseDuration(s)
			if err != nil || v < 0 || v > 5*time.Minute {
				http.Error(w, "wait: want a duration up to 5m", http.StatusBadRequest)
				return
			}
			wait = v
		}
		doc, err := io.ReadAll(io.LimitReader(r.Body, cluster.MaxConfigSize+1))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), wait)
		defer cancel()
		res, err := c.PushWait(ctx, doc)
		if errors.Is(err, cluster.ErrConfigRefused) {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		} else if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, res)
	})
}

// cmdClusterPushConfig is `hermod cluster push-config FILE [-http ADDR]
// [-wait D] [-json]`: it sends FILE to a node, which applies it, gives it
// the next version and distributes it; it prints each node's answer and
// fails unless every node applied it.
func cmdClusterPushConfig(args []string) error {
	fs := flag.NewFlagSet("cluster push-config", flag.ExitOnError)
	admin := fs.String("http", "127.0.0.1:8025", "admin address (host:port) of any running node")
	wait := fs.Duration("wait", 10*time.Second, "how long to wait for the nodes to apply it")
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Parse(args)
	rest := fs.Args()
	if len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		file := rest[0]
		fs.Parse(rest[1:]) // flags may follow the file
		rest = append([]string{file}, fs.Args()...)
	}
	if len(rest) != 1 {
		return errors.New("cluster push-config: want one FILE")
	}
	doc, err := os.ReadFile(rest[0])
	if err != nil {
		return err
	}
	res, err := postConfig(*admin, doc, *wait)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	} else {
		printPushResult(os.Stdout, res)
	}
	var notDone []string
	for _, n := range res.Nodes {
		if n.State != cluster.ConfigApplied {
			notDone = append(notDone, n.Name+" "+n.State)
		}
	}
	if len(notDone) > 0 {
		return fmt.Errorf("cluster push-config: version %d not applied everywhere: %s", res.Version, strings.Join(notDone, ", "))
	}
	return nil
}

func postConfig(admin string, doc []byte, wait time.Duration) (cluster.PushResult, error) {
	var res cluster.PushResult
	u := fmt.Sprintf("http://%s%s?wait=%s", admin, cluster.ConfigPath, wait)
	c := &http.Client{Timeout: wait + 30*time.Second}
	resp, err := c.Post(u, "application/toml", bytes.NewReader(doc))
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<10))
		return res, fmt.Errorf("cluster push-config: %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		return res, fmt.Errorf("cluster push-config: %w", err)
	}
	return res, nil
}

func printPushResult(w io.Writer, res cluster.PushResult) {
	fmt.Fprintf(w, "version %d (digest %s)\n", res.Version, res.Digest)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSTATE\tRUNS\tDETAIL")
	for _, n := range res.Nodes {
		detail := n.Note
		if n.Error != "" {
			detail = n.Error
		}
		detail = strings.ReplaceAll(strings.ReplaceAll(detail, ":\n", ": "), "\n", "; ")
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", n.Name, n.State, n.Version, detail)
	}
	tw.Flush()
}
