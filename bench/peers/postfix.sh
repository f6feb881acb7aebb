#!/usr/bin/env bash
# postfix.sh - Postfix as a loopback-only relay peer for hermod-bench
# (`hermod-bench compare SCENARIO --peer postfix` runs it; it is embedded in
# the binary, so nothing outside it is needed at run time). Needs root.
#
#   postfix.sh install
#       apt-get install postfix if it is missing (debconf preseeded "Local
#       only", no questions asked).
#   postfix.sh configure LISTEN_IP LISTEN_PORT TRANSPORT_FILE
#       Stop Postfix, purge its queue, and make it a relay that accepts mail
#       from 127.0.0.0/8 on LISTEN_IP:LISTEN_PORT for the domains of
#       TRANSPORT_FILE (lines "domain relay:[ip]:port") and sends each to
#       the address given there. No DNS anywhere. Durability is left at
#       Postfix's defaults (queue files fsynced before the 250); only process
#       and concurrency limits are raised so that Postfix is not throttled.
#       Env: SMTPD_TLS_CERT/SMTPD_TLS_KEY (PEM files) offer STARTTLS to the
#       load; SMTP_TLS=encrypt makes Postfix use STARTTLS to the sink
#       (the script itself does not verify the certificate; hermod-bench
#       then sets a policy map that verifies it against the run's CA and
#       enables TLS connection reuse: bench/peer_tls.go), SMTP_TLS=none
#       (default) never.
#   postfix.sh start | stop | flush | purge | queue
#       start/stop Postfix; flush the deferred queue now (postqueue -f);
#       delete every queued message; count queued messages.
set -euo pipefail

PF=/etc/postfix
TABLE=$PF/hermod-bench-transport

case "${1:-}" in
install)
  if command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ]; then exit 0; fi
  export DEBIAN_FRONTEND=noninteractive
  echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
  echo "postfix postfix/mailname string bench.localdomain" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postfix >/dev/null
  # The package may start it with its own configuration: stop it.
  postfix stop >/dev/null 2>&1 || true
  ;;
configure)
  ip=${2:?listen IP}; port=${3:?listen port}; transport=${4:?transport file}
  postfix status >/dev/null 2>&1 && postfix stop >/dev/null 2>&1 || true
  postsuper -d ALL >/dev/null 2>&1 || true
  install -m 0644 "$transport" "$TABLE"
  postmap "hash:$TABLE"
  smtpd_tls=none
  if [ -n "${SMTPD_TLS_CERT:-}" ]; then
    install -m 0644 "$SMTPD_TLS_CERT" $PF/hermod-bench-cert.pem
    install -m 0600 "$SMTPD_TLS_KEY" $PF/hermod-bench-key.pem
    postconf -e "smtpd_tls_cert_file = $PF/hermod-bench-cert.pem" "smtpd_tls_key_file = $PF/hermod-bench-key.pem"
    smtpd_tls=may
  fi
  postconf -e \
    'myhostname = postfix.bench.test' \
    'mydestination = $myhostname, localhost.localdomain, localhost' \
    "inet_interfaces = $ip" \
    'inet_protocols = ipv4' \
    'mynetworks = 127.0.0.0/8' \
    "relay_domains = hash:$TABLE" \
    "transport_maps = hash:$TABLE" \
    'relayhost =' \
    'default_transport = smtp' \
    'relay_transport = relay' \
    'default_process_limit = 200' \
    'default_destination_concurrency_limit = 50' \
    "smtpd_tls_security_level = $smtpd_tls" \
    "smtp_tls_security_level = ${SMTP_TLS:-none}" \
    'maillog_file = /var/log/postfix.log' \
    'delay_logging_resolution_limit = 3'
  # (debconf "Local only" sets default_transport/relay_transport = error;
  # the lines above undo that.) Everything else is the Postfix default,
  # e.g. in_flow_delay=1s, smtp_connection_cache_on_demand=yes.
  # master.cf: one smtpd listener, ours (maxproc 100); others commented out.
  postconf -M | awk '$2 == "inet" && $8 == "smtpd" {print $1}' | while read -r svc; do
    [ "$svc" = "$port" ] || postconf -M# "$svc/inet"
  done
  postconf -Me "$port/inet=$port inet n - y 100 - smtpd"
  # Debian copies /etc/hosts, resolv.conf etc. into the chroot here.
  if [ -x /usr/lib/postfix/configure-instance.sh ]; then /usr/lib/postfix/configure-instance.sh - || true; fi
  postfix check
  ;;
start) postfix start ;;
stop) postfix status >/dev/null 2>&1 && postfix stop || true ;;
flush) postqueue -f ;;
purge) postsuper -d ALL >/dev/null 2>&1 || true ;;
queue) find /var/spool/postfix/incoming /var/spool/postfix/active /var/spool/postfix/deferred \
         /var/spool/postfix/maildrop /var/spool/postfix/hold -type f 2>/dev/null | wc -l ;;
*) echo "usage: $0 install|configure IP PORT TRANSPORT_FILE|start|stop|flush|purge|queue" >&2; exit 2 ;;
esac
