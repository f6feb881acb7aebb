package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/hermod-mta/hermod/cluster"
	"github.com/hermod-mta/hermod/dnscache"
	"github.com/hermod-mta/hermod/engine"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

func cmdServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	cfgPath := fs.String("config", "", "TOML configuration file (default: embedded defaults)")
	fs.Parse(args)
	cfg, err := LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	level := new(slog.LevelVar)
	cfg, masterVersion, masterErr := loadStoredMaster(cfg)
	lv, _ := parseLevel(cfg.Log.Level)
	level.Set(lv)
	log := newLogger(cfg.Log.Format, level)
	if masterErr != nil {
		log.Error("stored cluster configuration not applied: running the local file", "err", masterErr)
	} else if masterVersion > 0 {
		log.Info("running the cluster configuration", "version", masterVersion)
	}
	d := &daemonState{cfgPath: *cfgPath, log: log, level: level, masterErr: masterErr}
	return d.run(cfg)
}

func newLogger(format string, level *slog.LevelVar) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// daemonState holds what a reload may change.
type daemonState struct {
	cfgPath string
	log     *slog.Logger
	level   *slog.LevelVar
	cfg     atomic.Pointer[Config]

	store     *spool.Store
	stats     *engine.DomainStats
	recent    *engine.RecentLog
	cluster   *cluster.Service
	confDist  *cluster.ConfigDist // master configuration (nil when not clustered)
	masterErr error               // why the stored master configuration was not applied at startup
	receiver  *engine.Receiver
	sched     *engine.Scheduler
	server    atomic.Pointer[netio.Server] // replaced when binding is retried
	healthy   atomic.Bool
}

func loadTLS(cfg netio.ServerConfig) (*tls.Config, error) {
	if cfg.TLSCert == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("smtp.tls_cert/tls_key: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

func (d *daemonState) run(cfg Config) error {
	log := d.log
	d.cfg.Store(&cfg)
	tlsCfg, err := loadTLS(cfg.SMTP.ServerConfig)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.Spool.Dir, 0o750); err != nil {
		return fmt.Errorf("spool.dir: %w", err)
	}
	store, err := spool.Open(cfg.Spool, log.With("component", "spool"))
	if err != nil {
		return err
	}
	d.store = store
	defer func() {
		if err := store.Close(); err != nil {
			log.Error("closing spool", "err", err)
		}
	}()
	st := store.Stats()
	log.Info("spool open", "dir", cfg.Spool.Dir, "messages", st.Messages)

	var elog *engine.EventLog
	if cfg.Log.DeliveryLog != "off" {
		if cfg.Log.DeliveryLog != "-" {
			_ = os.MkdirAll(filepath.Dir(cfg.Log.DeliveryLog), 0o750)
		}
		elog, err = engine.OpenEventLog(cfg.Log.DeliveryLog)
		if err != nil {
			return fmt.Errorf("log.delivery_log: %w", err)
		}
		defer elog.Close()
	}

	resolver, err := dnscache.New(cfg.DNS, log.With("component", "dns"))
	if err != nil {
		return err
	}
	defer resolver.Close()
	schedOpt := engine.SchedulerOptions{
		Store:    store,
		Resolver: resolver,
		Hostname: cfg.Server.Hostname,
		Logger:   log.With("component", "scheduler"),
		Log:      elog,
	}
	d.stats = engine.NewDomainStats(engine.DomainStatsOptions{})
	d.recent = engine.NewRecentLog(0)
	schedOpt.Observe = func(r *engine.DeliveryRecord) {
		d.stats.Observe(r)
		d.recent.Observe(r)
	}
	var recv *engine.Receiver // set below; takeover listeners serve it
	if cfg.Cluster.Enabled() {
		svc, err := d.startCluster(cfg, store, resolver, func() netio.Backend { return recv })
		if err != nil {
			return err
		}
		d.cluster = svc
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := svc.Close(ctx); err != nil {
				log.Error("leaving the cluster", "err", err)
			}
		}()
		schedOpt.Limits = svc.Limits()
		schedOpt.Recorded = svc.Recorded
		schedOpt.Replicate = svc.Replicate
	}
	sched, err := engine.NewScheduler(cfg.Delivery, schedOpt)
	if err != nil {
		return err
	}
	d.sched = sched
	sched.Start()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := sched.Stop(ctx); err != nil {
			log.Error("stopping the scheduler", "err", err)
		}
	}()

	recvOpt := engine.ReceiverOptions{
		Hostname:  cfg.Server.Hostname,
		Store:     store,
		Logger:    log.With("component", "receiver"),
		Log:       elog,
		Accepted:  sched.Enqueue,
		Arriving:  sched.Arriving,
		Abandoned: sched.Abandon,
	}
	if d.cluster != nil {
		recvOpt.Replicate = d.cluster.Replicate
		recvOpt.Guard = d.cluster.Inbound()
	}
	recv, err = engine.NewReceiver(cfg.SMTP.RelayConfig, recvOpt)
	if err != nil {
		return err
	}
	d.receiver = recv

	srv, err := netio.NewServer(cfg.SMTP.ServerConfig, recv, tlsCfg, log.With("component", "smtp"))
	if err != nil {
		return err
	}
	d.server.Store(srv)

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		store.Collector(),
		resolver.Collector(),
		sched.Collector(),
		recv.Collector(),
		liveServerCollector{d},
	)
	var httpSrv *http.Server
	if cfg.HTTP.Listen != "off" {
		ln, err := net.Listen("tcp", cfg.HTTP.Listen)
		if err != nil {
			return fmt.Errorf("http.listen: %w", err)
		}
		httpSrv = &http.Server{Handler: d.httpHandler(reg), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := httpSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server", "err", err)
			}
		}()
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve() }()
	// In a cluster a peer may still answer on our address (it took it
	// over while we were down) until it sees us alive: retry for a while.
	for deadline := time.Now().Add(30 * time.Second); ; {
		select {
		case <-srv.Ready():
		case err := <-serveErr:
			if d.cluster == nil || time.Now().After(deadline) {
				return err
			}
			log.Warn("SMTP address busy (a peer may hold it); retrying", "err", err)
			time.Sleep(500 * time.Millisecond)
			if srv, err = netio.NewServer(cfg.SMTP.ServerConfig, recv, tlsCfg, log.With("component", "smtp")); err != nil {
				return err
			}
			d.server.Store(srv)
			go func() { serveErr <- srv.Serve() }()
			continue
		}
		break
	}
	// Signals are caught before the daemon says it is ready: a SIGHUP
	// sent as soon as /healthz answers (or systemd's READY=1) must reload,
	// not kill the process (or vanish, when started with SIGHUP ignored,
	// as under nohup).
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	d.healthy.Store(true)
	if d.confDist != nil {
		d.confDist.Start()
		defer d.confDist.Close()
	}
	log.Info("hermod ready", "smtp", cfg.SMTP.Listen, "http", cfg.HTTP.Listen, "hostname", cfg.Server.Hostname)
	_, _ = daemon.SdNotify(false, daemon.SdNotifyReady)
	stopWatchdog := startWatchdog()
	defer stopWatchdog()

	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				_, _ = daemon.SdNotify(false, daemon.SdNotifyReloading)
				d.reload()
				_, _ = daemon.SdNotify(false, daemon.SdNotifyReady)
				continue
			}
			log.Info("shutting down", "signal", sig.String())
			_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
			d.healthy.Store(false)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := srv.Shutdown(ctx)
			if httpSrv != nil {
				_ = httpSrv.Shutdown(ctx)
			}
			cancel()
			<-serveErr
			return err
		case err := <-serveErr:
			return fmt.Errorf("smtp server stopped: %w", err)
		case <-d.store.Failed():
			// A WAL write or sync failed (ENOSPC, EIO): the spool refuses
			// every write until it is reopened. Every acknowledged message
			// is on disk; stop, so that the service manager restarts
			// hermod (Restart=on-failure), which reopens the spool and
			// replays its WAL. Until then clients get 451 or no answer,
			// and keep their mail.
			ferr := d.store.Err()
			log.Error("spool failed: stopping for a restart", "err", ferr)
			_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
			d.healthy.Store(false)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = srv.Shutdown(ctx)
			if httpSrv != nil {
				_ = httpSrv.Shutdown(ctx)
			}
			cancel()
			<-serveErr
			return fmt.Errorf("spool failed: %w", ferr)
		}
	}
}

// startWatchdog pings systemd's watchdog when WATCHDOG_USEC is set.
func startWatchdog() func() {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil || interval == 0 {
		return func() {}
	}
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				_, _ = daemon.SdNotify(false, daemon.SdNotifyWatchdog)
			case <-stop:
				return
			}
		}
	}()
	return func() { close(stop) }
}

// flushIDs makes the queued messages ids due now and returns how many it
// rescheduled and the first error. Backoffs end before the mail is made
// due, and again after: a scan between the two would otherwise find it
// due while its destination is still backed off and suspend it until the
// old backoff's end without trying it.
func (d *daemonState) flushIDs(ids []spool.ID) (n int, firstErr error) {
	d.sched.Flush()
	defer d.sched.Flush()
	now := time.Now()
	for _, id := range ids {
		if err := d.store.Reschedule(id, now); err == nil {
			n++
		} else if firstErr == nil {
			firstErr = err
		}
	}
	return n, firstErr
}

// reload re-reads the configuration file (SIGHUP). What can change live is
// applied: log level, relay policy, TLS certificate. Other changes are
// reported as needing a restart. An invalid file changes nothing.
func (d *daemonState) reload() {
	old := d.cfg.Load()
	cfg, err := LoadConfig(d.cfgPath)
	if err != nil {
		d.log.Error("reload refused: configuration invalid, keeping the running one", "err", err)
		return
	}
	if mcfg, v, err := loadStoredMaster(cfg); err != nil {
		d.log.Error("reload: the stored cluster configuration does not fit the file; running the file alone", "err", err)
	} else if v > 0 {
		cfg = mcfg
	}
	tlsCfg, err := loadTLS(cfg.SMTP.ServerConfig)
	if err != nil {
		d.log.Error("reload refused", "err", err)
		return
	}
	if err := d.receiver.SetPolicy(cfg.SMTP.RelayConfig); err != nil {
		d.log.Error("reload refused", "err", err)
		return
	}
	lv, _ := parseLevel(cfg.Log.Level)
	d.level.Set(lv)
	d.server.Load().SetTLSConfig(tlsCfg)
	d.applyClusterLive(cfg)
	// Keys that need a restart.
	for _, sec := range restartSections(*old, cfg) {
		d.log.Warn("reload: changes to this section take effect at the next restart", "section", sec)
	}
	d.cfg.Store(&cfg)
	d.log.Info("configuration reloaded", "log_level", cfg.Log.Level, "relay_networks", cfg.SMTP.RelayNetworks,
		"relay_domains", cfg.SMTP.RelayDomains, "starttls", tlsCfg != nil)
}

func (d *daemonState) httpHandler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := d.store.Err(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		if !d.healthy.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /api/queue", func(w http.ResponseWriter, r *http.Request) {
		limit := 1000
		if s := r.URL.Query().Get("limit"); s != "" {
			if n, err := strconv.Atoi(s); err == nil && n > 0 {
				limit = n
			}
		}
		list, err := queueList(d.store, limit)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, list)
	})
	mux.HandleFunc("GET /api/queue/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := spool.ParseID(r.PathValue("id"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		m, err := d.store.Load(id)
		if errors.Is(err, spool.ErrNotFound) {
			http.Error(w, "no such message", http.StatusNotFound)
			return
		} else if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, toQueueEntry(m))
	})
	// Queue operations: flush (everything due now) and delete.
	mux.HandleFunc("POST /api/queue/flush", func(w http.ResponseWriter, r *http.Request) {
		var ids []spool.ID
		if err := d.store.Walk(func(m *spool.Message) bool { ids = append(ids, m.ID); return true }); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		n, _ := d.flushIDs(ids)
		writeJSON(w, map[string]int{"flushed": n})
	})
	mux.HandleFunc("POST /api/queue/{id}/flush", func(w http.ResponseWriter, r *http.Request) {
		id, err := spool.ParseID(r.PathValue("id"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if _, err := d.flushIDs([]spool.ID{id}); errors.Is(err, spool.ErrNotFound) {
			http.Error(w, "no such message", http.StatusNotFound)
			return
		} else if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, map[string]int{"flushed": 1})
	})
	mux.HandleFunc("DELETE /api/queue/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := spool.ParseID(r.PathValue("id"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := d.store.Delete(id); errors.Is(err, spool.ErrNotFound) {
			http.Error(w, "no such message", http.StatusNotFound)
			return
		} else if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		d.log.Warn("message deleted by the operator", "msg_id", id.String())
		writeJSON(w, map[string]int{"deleted": 1})
	})
	mux.HandleFunc("GET /api/stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{
			"spool":     d.store.Stats(),
			"receiver":  d.receiver.Metrics(),
			"smtp":      d.server.Load().Metrics(),
			"scheduler": d.sched.Metrics(),
		})
	})
	mux.HandleFunc("GET /api/stats/domains", statsDomainsHandler(d.stats, time.Now))
	d.clusterRoutes(mux)
	configRoutes(mux, func() *cluster.ConfigDist { return d.confDist })
	d.logRoutes(mux)
	// Top-N destinations (Postfix's qshape, live): busiest first.
	mux.HandleFunc("GET /api/domains", func(w http.ResponseWriter, r *http.Request) {
		n := 20
		if v, err := strconv.Atoi(r.URL.Query().Get("n")); err == nil && v > 0 {
			n = v
		}
		writeJSON(w, d.sched.TopDomains(n))
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// QueueEntry is one message in the admin API and `hermod queue` output.
type QueueEntry struct {
	// Node is the cluster node holding it (cluster-wide listings only).
	Node     string    `json:"node,omitempty"`
	ID       string    `json:"id"`
	From     string    `json:"from"`
	Received time.Time `json:"received"`
	Size     int64     `json:"size"`
	// EnvID and Ret are the DSN ENVID and RET parameters (RFC 3461).
	EnvID string      `json:"envid,omitempty"`
	Ret   string      `json:"ret,omitempty"`
	Rcpts []QueueRcpt `json:"rcpts"`
}

// QueueRcpt is one recipient of a QueueEntry.
type QueueRcpt struct {
	Addr        string    `json:"addr"`
	State       string    `json:"state"`
	Attempts    uint32    `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt"`
	LastReply   string    `json:"last_reply,omitempty"`
	// Notify ("NEVER", or a list of SUCCESS, FAILURE, DELAY) and ORcpt
	// are the recipient's DSN parameters, as the client gave them.
	Notify string `json:"notify,omitempty"`
	ORcpt  string `json:"orcpt,omitempty"`
}

func toQueueEntry(m *spool.Message) QueueEntry {
	e := QueueEntry{ID: m.ID.String(), From: m.From, Received: m.Received, Size: m.Size, EnvID: m.EnvID, Ret: m.Ret}
	for _, r := range m.Rcpts {
		e.Rcpts = append(e.Rcpts, QueueRcpt{Addr: r.Addr, State: r.State.String(), Attempts: r.Attempts, NextAttempt: r.NextAttempt,
			LastReply: r.LastReply, Notify: spool.FormatNotify(r.Notify), ORcpt: r.ORcpt})
	}
	return e
}

func queueList(st *spool.Store, limit int) ([]QueueEntry, error) {
	list := []QueueEntry{}
	err := st.Walk(func(m *spool.Message) bool {
		list = append(list, toQueueEntry(m))
		return len(list) < limit
	})
	return list, err
}

// liveServerCollector reports the metrics of the current SMTP server (it
// is replaced when binding its address is retried at startup).
type liveServerCollector struct{ d *daemonState }

func (c liveServerCollector) Describe(ch chan<- *prometheus.Desc) {
	c.d.server.Load().Collector().Describe(ch)
}

func (c liveServerCollector) Collect(ch chan<- prometheus.Metric) {
	c.d.server.Load().Collector().Collect(ch)
}

// applyClusterLive applies what of [cluster] changes live: the
// cluster-wide domain limits and rates.
func (d *daemonState) applyClusterLive(cfg Config) {
	if d.cluster == nil {
		return
	}
	d.cluster.Limits().SetLimits(cfg.Cluster.DomainLimits)
	d.cluster.Limits().SetRates(cfg.Cluster.DomainRates)
	d.cluster.Limits().SetSiteLimits(cfg.Cluster.SiteLimits, nil)
}
