// Command hermod is the Hermod mail delivery daemon and its admin CLI.
//
//	hermod serve [-config FILE]          run the daemon (embedded defaults without -config)
//	hermod check-config [-config FILE]   validate a configuration and print it with defaults
//	hermod queue list [-http ADDR [-cluster] | -spool DIR] [-limit N]
//	hermod queue show ID [-http ADDR | -spool DIR]
//	hermod queue flush [ID] [-http ADDR]
//	hermod queue delete ID [-http ADDR]
//	hermod stats [-http ADDR] [-minutes N | -hours N] [-domain D] [-top N]
//	hermod log [-cluster] [-domain D] [-event E] [-msg ID] [-rcpt R] [-minutes N] [-n N]
//	hermod cluster members|stats|blocks [-http ADDR]
//	hermod cluster block|unblock CIDR [-for DURATION] [-reason TEXT]
//	hermod cluster push-config FILE [-http ADDR] [-wait 10s] [-json]
//	hermod version
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/hermod-mta/hermod/spool"
)

// version is set by the Makefile with -ldflags.
var version = "dev"

const usage = `usage: hermod <command> [flags]

commands:
  serve         run the daemon (-config FILE; embedded defaults without it)
  check-config  validate a configuration file and print it with all defaults
  queue list    list queued messages (-http ADDR of a running daemon, -cluster for every node, or -spool DIR offline)
  queue show ID show one queued message
  queue flush [ID]
                make queued mail due now (all, or one message) and lift destination backoffs
  queue delete ID
                remove a message from the queue (no bounce)
  stats         deliverability per destination domain (-http ADDR, -minutes N | -hours N, -domain D, -top N, -json)
  log           recent delivery records, newest first (-http ADDR, -cluster, -domain D, -event E, -msg ID, -rcpt R, -minutes N, -n N)
  cluster members
                the cluster's nodes as this node sees them (-http ADDR)
  cluster stats deliverability per domain for the whole cluster (-http ADDR, -minutes N | -hours N, -domain D, -top N)
  cluster push-config FILE [-http ADDR] [-wait 10s] [-json]
                distribute a master configuration to every node ([node.NAME] tables override per node)
  cluster block CIDR [-for DURATION] [-reason TEXT]
                refuse a network's connections on every node (554 5.7.1); cluster unblock CIDR, cluster blocks
  version       print the version
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = cmdServe(os.Args[2:])
	case "check-config":
		err = cmdCheckConfig(os.Args[2:])
	case "queue":
		err = cmdQueue(os.Args[2:])
	case "stats":
		err = cmdStats(os.Args[2:])
	case "cluster":
		err = cmdCluster(os.Args[2:])
	case "log":
		err = cmdLog(os.Args[2:])
	case "version", "-version", "--version":
		fmt.Println("hermod", version)
	case "help", "-h", "-help", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "hermod: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hermod:", err)
		os.Exit(1)
	}
}

func cmdCheckConfig(args []string) error {
	fs := flag.NewFlagSet("check-config", flag.ExitOnError)
	cfgPath := fs.String("config", "", "TOML configuration file")
	fs.Parse(args)
	cfg, err := LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	return toml.NewEncoder(os.Stdout).Encode(cfg)
}

func cmdQueue(args []string) error {
	if len(args) == 0 {
		return errors.New("queue: want list or show")
	}
	sub := args[0]
	fs := flag.NewFlagSet("queue "+sub, flag.ExitOnError)
	httpAddr := fs.String("http", "127.0.0.1:8025", "admin address of the running daemon")
	spoolDir := fs.String("spool", "", "read this spool directory directly (daemon stopped)")
	limit := fs.Int("limit", 1000, "list at most this many messages")
	asJSON := fs.Bool("json", false, "print JSON")
	all := fs.Bool("cluster", false, "list: every node of the cluster")
	var id string
	rest := args[1:]
	switch {
	case sub == "show" || sub == "delete":
		if len(rest) == 0 || strings.HasPrefix(rest[0], "-") {
			return fmt.Errorf("queue %s: want a queue id", sub)
		}
		id, rest = rest[0], rest[1:]
	case sub == "flush" && len(rest) > 0 && !strings.HasPrefix(rest[0], "-"):
		id, rest = rest[0], rest[1:]
	}
	fs.Parse(rest)
	switch sub {
	case "list":
		var list []QueueEntry
		if *spoolDir != "" {
			st, err := openSpoolOffline(*spoolDir)
			if err != nil {
				return err
			}
			defer st.Close()
			if list, err = queueList(st, *limit); err != nil {
				return err
			}
		} else if *all {
			var res struct {
				Messages []QueueEntry      `json:"messages"`
				Missing  map[string]string `json:"missing"`
			}
			if err := getJSON(fmt.Sprintf("http://%s/api/cluster/queue?limit=%d", *httpAddr, *limit), &res); err != nil {
				return err
			}
			list = res.Messages
			for node, e := range res.Missing {
				fmt.Fprintf(os.Stderr, "missing: %s: %s\n", node, e)
			}
		} else if err := getJSON(fmt.Sprintf("http://%s/api/queue?limit=%d", *httpAddr, *limit), &list); err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(os.Stdout).Encode(list)
		}
		tw := tabwriter.NewWriter(os.Stdout, 2, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tNODE\tRECEIVED\tSIZE\tFROM\tRCPTS\tPENDING")
		for _, e := range list {
			pending := 0
			for _, r := range e.Rcpts {
				if r.State == "pending" {
					pending++
				}
			}
			from := e.From
			if from == "" {
				from = "<>"
			}
			node := e.Node
			if node == "" {
				node = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%d\n", e.ID, node, e.Received.Format(time.RFC3339), e.Size, from, len(e.Rcpts), pending)
		}
		tw.Flush()
		fmt.Printf("%d message(s)\n", len(list))
		return nil
	case "show":
		var e QueueEntry
		if *spoolDir != "" {
			st, err := openSpoolOffline(*spoolDir)
			if err != nil {
				return err
			}
			defer st.Close()
			qid, err := spool.ParseID(id)
			if err != nil {
				return err
			}
			m, err := st.Load(qid)
			if err != nil {
				return err
			}
			e = toQueueEntry(m)
		} else if err := getJSON(fmt.Sprintf("http://%s/api/queue/%s", *httpAddr, id), &e); err != nil {
			return err
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(e)
	case "flush":
		url := fmt.Sprintf("http://%s/api/queue/flush", *httpAddr)
		if id != "" {
			url = fmt.Sprintf("http://%s/api/queue/%s/flush", *httpAddr, id)
		}
		var out map[string]int
		if err := doJSON(http.MethodPost, url, &out); err != nil {
			return err
		}
		fmt.Printf("%d message(s) due now\n", out["flushed"])
		return nil
	case "delete":
		var out map[string]int
		if err := doJSON(http.MethodDelete, fmt.Sprintf("http://%s/api/queue/%s", *httpAddr, id), &out); err != nil {
			return err
		}
		fmt.Printf("deleted %s\n", id)
		return nil
	}
	return fmt.Errorf("queue: unknown subcommand %q", sub)
}

func openSpoolOffline(dir string) (*spool.Store, error) {
	cfg := spool.DefaultConfig()
	cfg.Dir = dir
	st, err := spool.Open(cfg, nil)
	if err != nil {
		return nil, fmt.Errorf("open spool %s (is the daemon still running?): %w", dir, err)
	}
	return st, nil
}

func getJSON(url string, v any) error { return doJSON(http.MethodGet, url, v) }

func doJSON(method, url string, v any) error {
	c := &http.Client{Timeout: 30 * time.Second}
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s: %s: %s", url, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}
