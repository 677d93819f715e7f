"""Write a large policy for one sandbox Abloy system: DOORS doors, USERS people, GRANTS doors per person.

    python examples/large-fleet/generate.py OUT_DIR [--doors 1000] [--users 2000] [--grants 5]

Used by bench/fleet.py; also handy to see how plans of thousands of changes read.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def generate(out: Path, doors: int, users: int, grants: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "systems.yaml").write_text("systems:\n  fleet: {vendor: abloy-keyless, url: sandbox}\n")
    (out / "devices.yaml").write_text("devices:\n" + "".join(
        f"  door-{d:05d}: {{system: fleet, name: Door {d:05d}}}\n" for d in range(doors)))
    (out / "users.yaml").write_text("users:\n" + "".join(f"  person-{u:05d}: {{}}\n" for u in range(users)))
    lines = ["permissions:\n"]
    for u in range(users):
        granted = ", ".join(f"door-{(u * 7 + g * 13) % doors:05d}" for g in range(grants))
        lines.append(f"  - users: [person-{u:05d}]\n    devices: [{granted}]\n"
                     "    start: 2026-01-01T00:00:00Z\n    end: 2027-12-31T23:59:59Z\n")
    (out / "access.yaml").write_text("".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--doors", type=int, default=1000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--grants", type=int, default=5)
    args = parser.parse_args()
    generate(args.out, args.doors, args.users, args.grants)


if __name__ == "__main__":
    main()
