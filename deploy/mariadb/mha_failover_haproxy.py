#!/usr/bin/env python3
"""MHA's master_ip_failover_script: moves the applications' address (an HAProxy
listener) from the dead primary to the promoted one, through HAProxy's runtime API.

MHA calls it with --command=status (at start), stop/stopssh (fence the old primary,
before any recovery) and start (route to the new primary, once it has applied every
log). Each server in the HAProxy backend is named db_<port>. Extra options, set in the
MHA configuration: --haproxy_socket=PATH (the admin socket), --backend=NAME, and
--haproxy_cfg=PATH (HAProxy's configuration file, rewritten to match, so a reload or a
restart of HAProxy cannot route back to the old primary).

stop puts the old primary in maintenance and cuts its sessions, so nothing reaches it
through HAProxy again (and it starts read-only if it comes back: node.cnf). start makes
the new primary writable before it is routed to, so a client never meets a read-only
primary. Only the standard library: MHA runs this with the system's python3."""

import argparse
import os
import re
import socket
import subprocess
import sys


def haproxy(path, command, quiet=True):
    """Run one runtime command; `quiet` ones answer nothing when they succeed."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    text = answer.decode().strip()
    if quiet and text:
        raise RuntimeError(f"haproxy: {command!r}: {text}")
    return text


def mark_disabled(cfg, port, disabled):
    """Add or drop `disabled` on the line of server db_<port> in the configuration."""
    with open(cfg) as f:
        text = f.read()
    line = re.compile(rf"^(\s*server db_{port} \S+)( disabled)?[ \t]*$", re.M)
    if not line.search(text):
        raise RuntimeError(f"{cfg}: no line for server db_{port}")
    text = line.sub(lambda m: m.group(1) + (" disabled" if disabled else ""), text)
    with open(cfg + ".new", "w") as f:
        f.write(text)
    os.replace(cfg + ".new", cfg)


def sql(host, port, user, password, statement):
    subprocess.run(["mariadb", "--no-defaults", "--connect-timeout=2", f"-h{host}",
                    f"-P{port}", f"-u{user}", f"-p{password}", "-e", statement],
                   check=True, stdout=subprocess.DEVNULL)


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--command", required=True)
    p.add_argument("--haproxy_socket", required=True)
    p.add_argument("--backend", default="mariadb")
    p.add_argument("--haproxy_cfg")
    for name in ("orig_master_ip", "orig_master_port", "new_master_ip", "new_master_port",
                 "new_master_user", "new_master_password"):
        p.add_argument(f"--{name}")
    args, _ = p.parse_known_args(argv)   # MHA passes more (ssh users, hosts, ...)
    if args.command == "status":
        haproxy(args.haproxy_socket, "show servers state", quiet=False)
        return 0
    if args.command in ("stop", "stopssh"):
        old = f"{args.backend}/db_{args.orig_master_port}"
        haproxy(args.haproxy_socket, f"set server {old} state maint")
        haproxy(args.haproxy_socket, f"shutdown sessions server {old}")
        if args.haproxy_cfg:
            mark_disabled(args.haproxy_cfg, args.orig_master_port, True)
        print(f"fenced {old}: in maintenance, its sessions cut")
        return 0
    if args.command == "start":
        sql(args.new_master_ip, args.new_master_port, args.new_master_user,
            args.new_master_password, "SET GLOBAL read_only = OFF")
        new = f"{args.backend}/db_{args.new_master_port}"
        if args.haproxy_cfg:
            mark_disabled(args.haproxy_cfg, args.new_master_port, False)
        haproxy(args.haproxy_socket, f"set server {new} state ready")
        print(f"routing to {new}")
        return 0
    print(f"unknown command {args.command!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
