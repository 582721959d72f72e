#!/bin/sh
# The guest script of the qemu testbed (busybox sh). run.sh packs it as /testbed/guest.sh; /init
# runs it once rxe0 is up and prints the result line from its exit status.
#
# Every check is one `step NAME COMMAND [ARGS...]` line. A step passes when its command exits 0.
# All steps run, even after a failure; the failed ones are reported by name:
#   DMAPLANE-TESTBED-RESULT: fail rc-pingpong, dmabuf
#
# Host binaries given to run.sh are in /testbed/bin (on PATH) under the names run.sh was given
# (NAME=PATH). Extra steps files given to run.sh (--steps FILE) are in /testbed/steps.d/ and are
# sourced at the hook below, after the built-in steps; they may define shell functions and call
# `step` exactly as this file does.
#
# COMMAND is run under `timeout -s KILL $STEP_TIMEOUT` (seconds, default 300) unless it is a shell
# function of this file, which then bounds its own commands.

# shellcheck disable=SC2317 # the helpers below are called through `step`
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
export RUST_BACKTRACE=1
FAILED=""
NSTEPS=0

step() {
	_step_name="$1"
	shift
	NSTEPS=$((NSTEPS + 1))
	echo "== step $_step_name: begin: $*"
	_step_t0=$(date +%s)
	case "$(type "$1" 2>/dev/null)" in
	*function*) "$@" ;;
	*) timeout -s KILL "$STEP_TIMEOUT" "$@" ;;
	esac
	_step_rc=$?
	_step_t=$(($(date +%s) - _step_t0))
	if [ "$_step_rc" = 0 ]; then
		echo "== step $_step_name: ok (${_step_t}s)"
	else
		echo "== step $_step_name: FAIL (exit $_step_rc after ${_step_t}s)"
		FAILED="${FAILED:+$FAILED, }$_step_name"
	fi
}

# --- helpers ---------------------------------------------------------------------------------

# The storage fault tests, on a small tmpfs and a failing scsi_debug disk.
storage_faults() {
	mkdir -p /mnt/small && mount -t tmpfs -o size=4m tmpfs /mnt/small || return 1
	disk=""
	for b in /sys/block/sd*; do
		[ -e "$b" ] && grep -q scsi_debug "$b/device/model" 2>/dev/null && disk="/dev/${b##*/}"
	done
	[ -n "$disk" ] || { echo "no scsi_debug disk in /sys/block"; return 1; }
	echo 2 >/sys/bus/pseudo/drivers/scsi_debug/opts || return 1
	rc=0
	timeout -s KILL 120 env DMAPLANE_REQUIRE_FAULTS=1 DMAPLANE_REQUIRE_IO_URING=1 \
		DMAPLANE_SMALL_FS=/mnt/small DMAPLANE_EIO_DEV="$disk" DMAPLANE_EIO_AT=$((0x1234 * 512)) \
		storage-faults --test-threads=1 --nocapture || rc=1
	timeout -s KILL 120 env DMAPLANE_REQUIRE_FAULTS=1 DMAPLANE_SMALL_FS=/mnt/small \
		dmaplane-file --test-threads=1 --nocapture enospc || rc=1
	echo 0 >/sys/bus/pseudo/drivers/scsi_debug/opts
	umount /mnt/small
	return $rc
}

# rxe0 exists and its port is ACTIVE.
rxe_active() {
	out="$(timeout -s KILL 60 ibv_devinfo -d rxe0)" || return 1
	echo "$out"
	echo "$out" | grep -q 'state:[[:space:]]*PORT_ACTIVE'
}

# Is a TCP port (decimal) listening? (/proc/net/tcp*, no netstat needed)
tcp_listening() {
	hex=$(printf '%04X' "$1")
	cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { f = 1 } END { exit !f }'
}

# The GID index of rxe0's RoCE v2 entry for the IPv4 address (the link-local IPv6 entry at
# index 0 does not resolve for loopback QPs: modify QP to RTR fails).
rxe_ipv4_gid() {
	for g in /sys/class/infiniband/rxe0/ports/1/gids/*; do
		i=${g##*/}
		case "$(cat "$g")" in
		0000:0000:0000:0000:0000:ffff:*)
			[ "$(cat "/sys/class/infiniband/rxe0/ports/1/gid_attrs/types/$i" 2>/dev/null)" = "RoCE v2" ] &&
				echo "$i" && return 0
			;;
		esac
	done
	return 1
}

# ibv_rc_pingpong server and client (two processes) over rxe0: 1000 x 4 KiB each way.
rc_pingpong() {
	gid=$(rxe_ipv4_gid) || {
		echo "rc_pingpong: rxe0 has no RoCE v2 GID for an IPv4 address"
		return 1
	}
	args="-d rxe0 -g $gid -n 1000 -s 4096 -p 18515"
	# shellcheck disable=SC2086
	timeout -s KILL 120 ibv_rc_pingpong $args >/tmp/pingpong-server.log 2>&1 &
	server=$!
	i=0
	until tcp_listening 18515; do
		i=$((i + 1))
		if [ "$i" -gt 100 ] || ! kill -0 "$server" 2>/dev/null; then
			echo "rc_pingpong: the server never listened"
			cat /tmp/pingpong-server.log
			kill -KILL "$server" 2>/dev/null
			return 1
		fi
		sleep 0.1
	done
	# shellcheck disable=SC2086
	timeout -s KILL 120 ibv_rc_pingpong $args localhost
	client_rc=$?
	wait "$server"
	server_rc=$?
	sed 's/^/server: /' /tmp/pingpong-server.log
	[ "$client_rc" = 0 ] && [ "$server_rc" = 0 ]
}

# A stress run with `--inject FAULT` must exit non-zero with the line that names the fault: a
# fault the stress does not notice is a check that cannot fail.  caught FAULT COMMAND...
caught() {
	fault="$1"
	shift
	timeout -s KILL "$STEP_TIMEOUT" "$@" --inject "$fault" >/tmp/inject.log 2>&1
	rc=$?
	cat /tmp/inject.log
	if [ "$rc" = 0 ]; then
		echo "caught: --inject $fault exited 0: the fault went unnoticed"
		return 1
	fi
	grep -q "stress failed (fault injected: $fault)" /tmp/inject.log || {
		echo "caught: --inject $fault exited $rc without naming the fault"
		return 1
	}
}
# The raw verbs stress, and the lab stress on the application library.
expect_caught() {
	caught "$1" dmaplane stress revoke --backend verbs \
		--qps 4 --depth 16 --size 4096 --revokes 4 --seconds 0 --deadline-ms 2000
}
expect_caught_cuda() {
	caught "$1" env LD_LIBRARY_PATH=/testbed/bin dmaplane stress revoke --backend verbs \
		--exporter cuda --device rxe0 --qps 4 --depth 16 --size 4096 --revokes 4 --seconds 0 --deadline-ms 2000
}
expect_caught_cuda_agent() {
	caught "$1" env LD_LIBRARY_PATH=/testbed/bin dmaplane stress revoke --backend verbs --layer agent \
		--exporter cuda --device rxe0 --qps 4 --size 4096 --revokes 4 --seconds 0 --deadline-ms 2000
}

# --- built-in steps --------------------------------------------------------------------------

step rxe0-active rxe_active
step rc-pingpong rc_pingpong
# The real dma-buf exporters (udmabuf, dma-heap): absence of the devices is a failure here.
step dmabuf env DMAPLANE_REQUIRE_DMABUF=1 core-dmabuf --test-threads=2
step rdma-verbs env DMAPLANE_REQUIRE_RDMA=1 DMAPLANE_REQUIRE_DMABUF=1 rdma-verbs --test-threads=2
# The command-line tool runs in the guest (host-built, dynamically linked).
step dmaplane-topo dmaplane topo
# Revoke under load on rxe0: two contexts, RC WRITEs into udmabuf memory (dma-buf MR refused,
# fallback to the process mapping), leases revoked and acked over TCP. The command exits non-zero
# unless nothing was lost, nothing failed and nothing touched memory after an ack. The default
# policy stops each QP at a message boundary (SQD, `sq_draining` polled), so 64 KiB WRITEs
# (64 packets at rxe0's path MTU of 1024) are never cut; flushing needs one-packet WRITEs;
# draining takes any size. The deadline is generous: rxe under emulation is slow.
step stress-revoke-verbs dmaplane stress revoke --backend verbs --qps 4 --depth 16 --size 65536 --revokes 10 --seconds 0 --deadline-ms 5000
step stress-revoke-verbs-flush dmaplane stress revoke --backend verbs --quiesce flush --qps 4 --depth 16 --size 1024 --revokes 20 --seconds 0
step stress-revoke-verbs-drain dmaplane stress revoke --backend verbs --quiesce drain --deadline-ms 5000 --qps 4 --depth 16 --size 4096 --revokes 20 --seconds 0
# A lying lease holder on rxe0 must make the stress fail, naming the fault.
step stress-revoke-verbs-inject expect_caught ack-then-write
step stress-revoke-verbs-inject-ignore expect_caught ignore-lease-revoke
# The application library on rxe0: two processes, each with an Agent, meet over TCP; 64 MiB
# WRITE (verified by the peer after the notification) and READ back, then a deregistration in
# the middle of a transfer (a typed error; the connection and the peer's memory live on).
step agent-verbs env DMAPLANE_REQUIRE_RDMA=1 DMAPLANE_REQUIRE_DMABUF=1 DMAPLANE_RDMA_DEVICE=rxe0 dmaplane-verbs --test-threads=1 --nocapture
# The library against the raw verbs layer on rxe0, in the same run.
# Files into CUDA memory (the fake driver) on verbs: O_DIRECT through io_uring into a
# cuMemHostRegister'ed bounce, then the copy engine.
step agent-verbs-cuda-files env LD_LIBRARY_PATH=/testbed/bin DMAPLANE_REQUIRE_CUDA=1 DMAPLANE_REQUIRE_RDMA=1 DMAPLANE_RDMA_DEVICE=rxe0 dmaplane-verbs --test-threads=1 --nocapture cuda_memory
# The raw stress with CUDA memory (the fake driver, registered by device VA as below) as the
# export: the same harness as udmabuf's and the simulated testbed's; revoked under WRITE
# traffic and kept as a quarantine for the poison check.
step stress-revoke-cuda env LD_LIBRARY_PATH=/testbed/bin dmaplane stress revoke --backend verbs --exporter cuda --device rxe0 --qps 4 --depth 16 --size 65536 --revokes 10 --seconds 0 --deadline-ms 5000
step stress-revoke-cuda-inject expect_caught_cuda ack-then-write
step stress-revoke-cuda-inject-ignore expect_caught_cuda ignore-lease-revoke
# The lab stress on the application library: CUDA memory (the fake driver built from
# gpu/src/cuda/fake_libcuda.c, /testbed/bin/libcuda.so.1; its dma-buf handle is refused, so the
# negotiation registers the device VA through ibv_reg_mr, as with nvidia-peermem) freed under WRITE
# traffic from a second process; every freed block whole, nothing after the ack.
step stress-revoke-cuda-agent env LD_LIBRARY_PATH=/testbed/bin dmaplane stress revoke --backend verbs --layer agent --exporter cuda --device rxe0 --qps 4 --size 65536 --revokes 10 --seconds 0 --deadline-ms 5000
step stress-revoke-cuda-agent-inject expect_caught_cuda_agent ack-then-write
step stress-revoke-cuda-agent-inject-ignore expect_caught_cuda_agent ignore-lease-revoke
step bench-agent-verbs dmaplane bench agent --backend verbs --device rxe0 --seconds 0.05 --blocks 4096,65536 --batches 1,16
# dmaplane agent serve and its clients as separate processes: on the rxe device, and on TCP NICs.
step agent-bench-verbs dmaplane agent bench --backend verbs --device rxe0 --size 8m --block 1m --rounds 2 --seconds 0.1
step agent-bench-tcp dmaplane agent bench --size 8m --block 1m --rounds 2 --seconds 0.1
step dmaplane-doctor dmaplane doctor
# Real ENOSPC (a 4 MiB tmpfs filled by WRITE_FIXED and by the Agent's drive) and real EIO (a
# scsi_debug disk with its medium errors switched on: sectors 0x1234.. fail their reads).
step storage-faults storage_faults

# --- hook: extra steps passed in by the host ---------------------------------------------------
# run.sh --steps FILE (repeatable) puts FILE here; e.g. a file with the lines
#   step rdma-verbs env DMAPLANE_REQUIRE_RDMA=1 rdma-verbs --test-threads=1
#   step stress-revoke dmaplane stress revoke --backend verbs
# (with run.sh given rdma-verbs=PATH and dmaplane=PATH) adds those two checks.
for f in /testbed/steps.d/*; do
	[ -f "$f" ] || continue
	echo "== steps file ${f##*/}"
	# shellcheck disable=SC1090
	. "$f"
done

# --- report ----------------------------------------------------------------------------------
if [ -n "$FAILED" ]; then
	echo "$FAILED" >/tmp/testbed-failed
	echo "== $NSTEPS step(s), failed: $FAILED"
	exit 1
fi
echo "== $NSTEPS step(s), all passed"
exit 0
