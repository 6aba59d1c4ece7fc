#!/usr/bin/env python3
"""Writes the seccomp profile of the io-uring component: a runtime's default profile plus io_uring.

    python3 seccomp-profile.py DEFAULT.json [ARCH] > harbor-router-io-uring.json

DEFAULT.json is the profile your nodes' runtime applies as RuntimeDefault, in the Docker form
(`defaultAction`, `archMap`, `syscalls: [{names, action, includes, excludes, ...}]`):

- containerd and Docker Engine: moby's profiles/seccomp/default.json at the engine's release
  (containerd's built-in default follows the same list);
- CRI-O: /usr/share/containers/seccomp.json on the node.

ARCH is the nodes' architecture as `uname -m` prints it (x86_64, the default, or aarch64).

The output is in the OCI runtime-spec form, which containerd reads for Localhost profiles and CRI-O
accepts too: the Docker form's conditions are settled for this container, which runs with every
capability dropped (rules that need a capability are left out, rules excluded for no capability
are kept) on ARCH. io_uring_setup, io_uring_enter and io_uring_register are then taken out of every
rule that does not allow them and allowed by a rule of their own. Install the result on every node
as <kubelet root>/seccomp/harbor-router-io-uring.json (docs/deployment.md#io_uring-and-seccomp).
"""

import json
import sys

IO_URING = ["io_uring_setup", "io_uring_enter", "io_uring_register"]
ALLOW = "SCMP_ACT_ALLOW"
SCMP_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}
# The fields of a syscall rule in the OCI runtime spec (LinuxSyscall).
OCI_RULE_FIELDS = ("names", "action", "errnoRet", "args")


def applies(rule, arch):
    """Whether a Docker-form rule applies to a container on `arch` with no capabilities."""
    inc = rule.get("includes") or {}
    exc = rule.get("excludes") or {}
    if inc.get("caps"):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if exc.get("arches") and arch in exc["arches"]:
        return False
    return True


def with_io_uring(profile, uname_arch="x86_64"):
    if not isinstance(profile, dict) or not isinstance(profile.get("syscalls"), list):
        raise ValueError("not a seccomp profile in the Docker form (no `syscalls` list)")
    if "defaultAction" not in profile:
        raise ValueError("not a seccomp profile: no `defaultAction`")
    if uname_arch not in SCMP_ARCH:
        raise ValueError(f"unknown architecture {uname_arch!r}; one of {sorted(SCMP_ARCH)}")
    # Docker's `includes.arches` use Go's names (amd64, arm64).
    go_arch = {"x86_64": "amd64", "aarch64": "arm64"}[uname_arch]
    rules = []
    for rule in profile["syscalls"]:
        if not applies(rule, go_arch):
            continue
        names = list(rule.get("names") or ([rule["name"]] if "name" in rule else []))
        if rule.get("action") != ALLOW:
            names = [n for n in names if n not in IO_URING]
        if not names:
            continue
        oci = {k: rule[k] for k in OCI_RULE_FIELDS if k in rule}
        oci["names"] = names
        rules.append(oci)
    rules.append({"names": list(IO_URING), "action": ALLOW})
    out = {"defaultAction": profile["defaultAction"]}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    arches = [SCMP_ARCH[uname_arch]]
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == arches[0]:
            arches += entry.get("subArchitectures") or []
    out["architectures"] = arches
    out["syscalls"] = rules
    return out


def main(argv):
    if len(argv) not in (2, 3):
        sys.stderr.write(__doc__)
        return 2
    with open(argv[1]) as f:
        profile = json.load(f)
    try:
        out = with_io_uring(profile, argv[2] if len(argv) == 3 else "x86_64")
    except ValueError as e:
        sys.stderr.write(f"{argv[1]}: {e}\n")
        return 1
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
