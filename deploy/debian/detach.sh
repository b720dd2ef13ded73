# Sourced by the flowexport maintainer scripts (installed as
# /usr/share/flowexport/detach.sh).
#
# flowexport_detach: ends the pinned state the service left behind: the
# installed agent adopts it, exports every flow it holds to the configured
# sinks (stdout goes to the journal when there is one), detaches the programs
# and removes the pins. Does nothing when nothing is pinned.
flowexport_detach() {
    [ -x /usr/bin/flowexport ] || return 0
    config=/etc/flowexport/agent.toml
    [ -e "$config" ] || config=/dev/null
    sink=cat
    if [ -S /run/systemd/journal/stdout ] && command -v systemd-cat >/dev/null; then
        sink="systemd-cat -t flowexport-agent"
    fi
    status=0
    rm -f /run/flowexport-detach-failed
    { /usr/bin/flowexport agent --config "$config" --detach || echo $? >/run/flowexport-detach-failed; } | $sink
    if [ -e /run/flowexport-detach-failed ]; then
        rm -f /run/flowexport-detach-failed
        echo "flowexport: could not export the pinned flows (see the error above); fix it and run" >&2
        echo "  flowexport agent --config /etc/flowexport/agent.toml --detach" >&2
        echo "or discard them: rm -r /sys/fs/bpf/flowexport (their counts are lost)" >&2
        status=1
    fi
    return $status
}
