#!/bin/bash
# Needs: make build; hermod-bench sink -listen 127.0.0.2:2526 -chunking and
# hermod-bench dns -listen 127.0.0.1:5399 -mx 127.0.0.2 running. Uses /tmp/rb.
# usage: run.sh REPLICAS — two-node cluster, load into node a, CPU of both nodes
R=$1
B=${HERMOD_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/bin}
rm -rf /tmp/rb/a /tmp/rb/b; mkdir -p /tmp/rb/a /tmp/rb/b
for n in a b; do
  if [ $n = a ]; then ip=127.0.0.3; other=127.0.0.4; else ip=127.0.0.4; other=127.0.0.3; fi
  cat > /tmp/rb/$n/h.toml <<EOT
[server]
hostname = "$n.bench.test"
[smtp]
listen = ["$ip:2525"]
max_connections_per_ip = 500
[spool]
dir = "/tmp/rb/$n/spool"
[dns]
resolvers = ["127.0.0.1:5399"]
[delivery]
port = 2526
tls = "disabled"
[http]
listen = "$ip:8025"
[log]
delivery_log = "off"
level = "warn"
[cluster]
bind = "$ip:7946"
join = ["$other:7946"]
node_name = "$n"
replicas = $R
EOT
  $B/hermod serve -config /tmp/rb/$n/h.toml > /tmp/rb/$n/log 2>&1 &
  echo $! > /tmp/rb/$n/pid
done
for i in $(seq 100); do curl -sf 127.0.0.3:8025/healthz >/dev/null && curl -sf 127.0.0.4:8025/healthz >/dev/null && break; sleep 0.1; done
sleep 2
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
pa=$(cat /tmp/rb/a/pid); pb=$(cat /tmp/rb/b/pid)
a0=$(cpu $pa); b0=$(cpu $pb)
$B/hermod-bench load -target 127.0.0.3:2525 -sessions 50 -messages 20000 -duration 60s -domains 100 -quiet -out /tmp/rb/load-$R.json >/dev/null 2>&1
sleep 3
a1=$(cpu $pa); b1=$(cpu $pb)
python3 - "$R" "$a0" "$a1" "$b0" "$b1" <<'PY'
import json,sys
R,a0,a1,b0,b1=sys.argv[1],*map(int,sys.argv[2:])
j=json.load(open(f"/tmp/rb/load-{R}.json"))
acc=j.get("accepted") or j.get("Accepted")
lat=j.get("latency") or {}
hz=100
print(f"replicas={R} accepted={acc} rate={j.get('rate', j.get('accept_rate'))} cpu_a_us/msg={(a1-a0)/hz*1e6/acc:.0f} cpu_b_us/msg={(b1-b0)/hz*1e6/acc:.0f} lat={json.dumps(lat)[:300]}")
PY
curl -s 127.0.0.4:8025/api/cluster | python3 -c 'import json,sys; d=json.load(sys.stdin); print({k:v for k,v in d.items() if k!="members"})'
kill $pa $pb; wait 2>/dev/null
