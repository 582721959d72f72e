#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces joined by a veth pair (10.77.0.1 and
# 10.77.0.2), no loopback between them. `dmaplane agent serve` runs in one on a routable
# address with a secret; `agent write` and `agent read` run in the other, on TCP NICs: what a
# user with two ordinary machines does. Needs root (ip netns) and iproute2.
#
# Usage: tests/netns/two-hosts.sh [path/to/dmaplane]
set -euo pipefail
bin=$(realpath "${1:-target/release/dmaplane}")
a=dmpl-a-$$
b=dmpl-b-$$
dir=$(mktemp -d)
chmod 700 "$dir"
cleanup() {
  [ -n "${server:-}" ] && kill -INT "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  ip netns del "$a" 2>/dev/null || true
  ip netns del "$b" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "$a"
ip netns add "$b"
ip link add "va-$$" type veth peer name "vb-$$"
ip link set "va-$$" netns "$a"
ip link set "vb-$$" netns "$b"
ip -n "$a" addr add 10.77.0.1/24 dev "va-$$"
ip -n "$b" addr add 10.77.0.2/24 dev "vb-$$"
for n in "$a" "$b"; do
  ip -n "$n" link set lo up
done
ip -n "$a" link set "va-$$" up
ip -n "$b" link set "vb-$$" up

"$bin" secret new "$dir/secret"
# Without the secret, a routable address is refused, saying why.
if ip netns exec "$a" "$bin" agent serve --listen 10.77.0.1:7474 > "$dir/refused" 2>&1; then
  echo "FAIL: a routable address without a secret was accepted"; exit 1
fi
grep -q "without a secret" "$dir/refused" || { cat "$dir/refused"; echo "FAIL: the refusal does not say why"; exit 1; }

ip netns exec "$a" "$bin" agent serve --listen 10.77.0.1:7474 --secret-file "$dir/secret" \
  --mem pool=64m --fill > "$dir/serve.out" 2> "$dir/serve.err" &
server=$!
for _ in $(seq 1 100); do grep -q '^LISTEN' "$dir/serve.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^LISTEN 10.77.0.1:7474' "$dir/serve.out" || { cat "$dir/serve.out" "$dir/serve.err"; echo "FAIL: no server"; exit 1; }

ip netns exec "$b" "$bin" --json agent read --connect 10.77.0.1:7474 --secret-file "$dir/secret" --verify | tee "$dir/read.json"
grep -q '"verified":true' "$dir/read.json"
# Two network namespaces are two hosts to the shared-memory path: the lane cannot be reached, and
# every byte takes the socket.
grep -q '"path":"socket"' "$dir/read.json" || { echo "FAIL: across namespaces the bytes did not take the socket"; exit 1; }
ip netns exec "$b" "$bin" --json agent write --connect 10.77.0.1:7474 --secret-file "$dir/secret" --notify across | tee "$dir/write.json"
grep -q '"verified":true' "$dir/write.json"
# A peer without the secret is refused at the handshake.
if ip netns exec "$b" "$bin" agent read --connect 10.77.0.1:7474 > "$dir/nosecret" 2>&1; then
  echo "FAIL: a peer without the secret was served"; exit 1
fi
grep -qi "secret" "$dir/nosecret" || { cat "$dir/nosecret"; echo "FAIL: the refusal does not say why"; exit 1; }
kill -INT "$server"
wait "$server"
server=
grep -q "notification from client" "$dir/serve.out" || { cat "$dir/serve.out"; echo "FAIL: no notification"; exit 1; }
grep -q "bye" "$dir/serve.err"

# A wildcard listener: peers are told the advertised address, for the handshake and the NICs.
ip netns exec "$a" "$bin" agent serve --listen 0.0.0.0:7475 --advertise 10.77.0.1:7475 \
  --secret-file "$dir/secret" --mem pool=8m --fill > "$dir/serve2.out" 2> "$dir/serve2.err" &
server=$!
for _ in $(seq 1 100); do grep -q '^LISTEN' "$dir/serve2.out" 2>/dev/null && break; sleep 0.1; done
ip netns exec "$b" "$bin" --json agent read --connect 10.77.0.1:7475 --secret-file "$dir/secret" --verify | tee "$dir/read2.json"
grep -q '"verified":true' "$dir/read2.json"
kill -INT "$server"
wait "$server"
server=
echo "two hosts (network namespaces): read and write verified across 10.77.0.1 <-> 10.77.0.2 with a secret, a wildcard listener advertised; no secret, no service"
