package cluster

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/hermod-mta/hermod/spool"
)

// takenLog remembers which messages of which failed node this node took
// over, so that the node, when it returns, drops them from its own spool
// instead of delivering them again. One line per message, "node id",
// appended and fsynced before the message is delivered here.
type takenLog struct {
	mu   sync.Mutex
	f    *os.File
	byID map[string][]spool.ID
}

func openTakenLog(path string) (*takenLog, error) {
	t := &takenLog{byID: map[string][]spool.ID{}}
	if data, err := os.ReadFile(path); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			node, s, ok := strings.Cut(line, " ")
			if !ok {
				continue
			}
			if id, err := spool.ParseID(s); err == nil {
				t.byID[node] = append(t.byID[node], id)
			}
		}
	} else if !os.IsNotExist(err) {
		return nil, fmt.Errorf("cluster: reading %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	t.f = f
	return t, nil
}

// add records ids of node as taken over, durably.
func (t *takenLog) add(node string, ids []spool.ID) error {
	if len(ids) == 0 {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	w := bufio.NewWriter(t.f)
	for _, id := range ids {
		fmt.Fprintf(w, "%s %s\n", node, id)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if err := t.f.Sync(); err != nil {
		return err
	}
	t.byID[node] = append(t.byID[node], ids...)
	return nil
}

// of returns the ids taken over from node.
func (t *takenLog) of(node string) []spool.ID {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]spool.ID(nil), t.byID[node]...)
}

// count returns how many messages were taken over in all.
func (t *takenLog) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, ids := range t.byID {
		n += len(ids)
	}
	return n
}

func (t *takenLog) close() error { return t.f.Close() }
