"""``spon plugins``: every loaded plugin, where it comes from and what it registers."""

import json

from spon_toolkit.hookspecs import hookimpl


def configure(parser):
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args, toolkit) -> int:
    infos = toolkit.plugin_infos()
    if args.json:
        print(json.dumps([
            {"name": i.name, "source": i.source, "location": i.location, "registers": i.registers}
            for i in infos
        ], indent=2))
        return 0
    for info in infos:
        print(f"{info.name}  [{info.source}: {info.location}]")
        if not info.registers:
            print("    (registers nothing)")
        for kind, names in info.registers.items():
            print(f"    {kind}: {', '.join(names)}")
    return 0


@hookimpl
def spon_register_commands(register):
    register("plugins", run, "list loaded plugins, their source and what they register", configure=configure)
