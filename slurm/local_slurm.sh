#!/usr/bin/env bash
# A real single-machine Slurm: munge, slurmctld and two slurmd emulating node1 and node2,
# all state under one directory, stopped by the pid files it wrote (never by name).
#
#   bash slurm/local_slurm.sh start [DIR]   # DIR defaults to ./.slurm; prints the env to use
#   bash slurm/local_slurm.sh stop [DIR]
#
# Needs root (daemons, /etc/hosts) and Debian's packages, which start installs.
# Partitions: debug (default, requeue on preemption) and urgent (preempts debug).
set -euo pipefail
cmd=${1:?start or stop}
dir=$(realpath -m "${2:-.slurm}")
hosts_line="127.0.0.1 node1 node2  # local_slurm.sh $dir"

stop() {
  for pid_file in "$dir"/run/*.pid; do
    [ -e "$pid_file" ] || continue
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pid_file"
  done
  if grep -qF "$hosts_line" /etc/hosts; then  # exactly the line start added
    grep -vF "$hosts_line" /etc/hosts > /etc/hosts.local_slurm && cat /etc/hosts.local_slurm > /etc/hosts
    rm -f /etc/hosts.local_slurm
  fi
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop [DIR]" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
fi
stop  # whatever an earlier start in this directory left running
mkdir -p "$dir"/{run,log,state,spool,bin}
host=$(hostname -s)

# munge: a key of our own and a socket in our directory
[ -e "$dir/munge.key" ] || mungekey -c -b 1024 -k "$dir/munge.key"
chmod 600 "$dir/munge.key"
munged --force --key-file="$dir/munge.key" --socket="$dir/run/munge.sock" --pid-file="$dir/run/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/state/munge.seed"

# sched_interval/bf_interval 2 s and cred_expire 10 s: requeued jobs restart in seconds, not minutes.
# preempt_send_user_signal: preemption sends USR2 (which Submitit acts on), not SIGTERM alone.
cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=17001
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/run/munge.sock,cred_expire=10
SlurmUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=3600
FirstJobId=$(( $(date +%s) % 60000000 + 1 ))  # below MaxJobId; fresh ids after a wipe
ReturnToService=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$(nproc) Sockets=1 CoresPerSocket=$(nproc) ThreadsPerCore=1 RealMemory=4000
PartitionName=debug  Nodes=ALL Default=YES PriorityTier=1  PreemptMode=REQUEUE GraceTime=30 MaxTime=INFINITE
PartitionName=urgent Nodes=ALL PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE
EOF
mkdir -p "$dir/spool/node1" "$dir/spool/node2"

# No accounting database: Submitit's sacct query is answered from scontrol.
cat > "$dir/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# Stand-in for `sacct -o JobID,State,NodeList --parsable2 -j ID[,ID]`, from scontrol.
ids=""; while [ $# -gt 0 ]; do [ "$1" = -j ] && { ids=$2; shift; }; shift; done
echo "JobID|State|NodeList"
for id in ${ids//,/ }; do
  scontrol show job -o "$id" 2>/dev/null | while read -r line; do
    jid=$(grep -o 'JobId=[^ ]*' <<<"$line" | cut -d= -f2); arr=$(grep -o 'ArrayTaskId=[^ ]*' <<<"$line" | cut -d= -f2)
    state=$(grep -o 'JobState=[^ ]*' <<<"$line" | cut -d= -f2); nodes=$(grep -o ' NodeList=[^ ]*' <<<"$line" | cut -d= -f2)
    echo "${arr:+${id}_$arr}${arr:-$jid}|$state|$nodes"
  done
done
EOF
chmod +x "$dir/bin/sacct"

grep -qF "$hosts_line" /etc/hosts || echo "$hosts_line" >> /etc/hosts  # node1/node2 must resolve for rendezvous
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF" -N node1
slurmd -f "$SLURM_CONF" -N node2
for _ in $(seq 60); do
  [ "$(sinfo -h -o %T 2>/dev/null | grep -c idle)" -ge 1 ] && break
  sleep 0.5
done
sinfo -h -o %T | grep -q idle || { echo "slurm did not come up: see $dir/log" >&2; stop; exit 1; }
echo "export SLURM_CONF=$SLURM_CONF PATH=$dir/bin:\$PATH"
