package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/hermod-mta/hermod/cluster"
	"github.com/hermod-mta/hermod/dnscache"
	"github.com/hermod-mta/hermod/netio"
	"github.com/hermod-mta/hermod/spool"
)

// startCluster joins the cluster and reconciles with the peers before
// delivery starts. backend returns the SMTP backend once it exists (nil
// before): listeners taken over from failed peers serve it.
func (d *daemonState) startCluster(cfg Config, store *spool.Store, resolver *dnscache.Cache, backend func() netio.Backend) (*cluster.Service, error) {
	log := d.log
	rcfg := cfg.Spool
	rcfg.Dir = filepath.Join(cfg.Spool.Dir, "replicas")
	httpAddr := cfg.HTTP.Listen
	if httpAddr == "off" {
		httpAddr = ""
	}
	svc, err := cluster.NewService(cfg.Cluster, cluster.ServiceOptions{
		Logger:       log.With("component", "cluster"),
		Store:        store,
		ReplicaSpool: rcfg,
		StateDir:     filepath.Join(cfg.Spool.Dir, "cluster"),
		SMTP:         cfg.SMTP.Listen,
		LookupMX: func(domain string) ([]string, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			mxs, err := resolver.LookupMX(ctx, domain)
			hosts := make([]string, len(mxs))
			for i, m := range mxs {
				hosts[i] = m.Host
			}
			return hosts, err
		},
		HTTP: httpAddr,
		Listen: func(addr string) (func(), error) {
			b := backend()
			if b == nil {
				return nil, errors.New("not serving yet")
			}
			return d.listenFor(cfg, addr, b)
		},
	})
	if err != nil {
		return nil, err
	}
	// Registered before the node starts: it handles gossip events.
	cd, err := d.newConfigDist(svc.Node(), cfg, d.masterErr)
	if err != nil {
		return nil, err
	}
	d.confDist = cd
	if err := svc.Start(); err != nil {
		return nil, err
	}
	if n := svc.Reconcile(); n > 0 {
		log.Warn("removed mail that peers delivered while this node was down", "messages", n)
	}
	return svc, nil
}

// listenFor serves SMTP on a failed peer's address with this node's
// backend and configuration; the returned function stops it.
func (d *daemonState) listenFor(cfg Config, addr string, b netio.Backend) (func(), error) {
	scfg := cfg.SMTP.ServerConfig
	scfg.Listen = []string{addr}
	tlsCfg, err := loadTLS(scfg)
	if err != nil {
		return nil, err
	}
	srv, err := netio.NewServer(scfg, b, tlsCfg, d.log.With("component", "smtp", "for", addr))
	if err != nil {
		return nil, err
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve() }()
	select {
	case <-srv.Ready():
	case err := <-errc:
		return nil, err
	case <-time.After(10 * time.Second):
		return nil, fmt.Errorf("listening on %s: timed out", addr)
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-errc
	}, nil
}
