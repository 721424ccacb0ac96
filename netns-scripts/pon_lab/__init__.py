"""The lab's modules; `netns-scripts/lab` is the command line (see its docstring).

    util        LabError, running commands, printing
    topology    the topology file: validation, addressing, relay paths
    renderer    pon-lab-config: the well-known ports and the daemons' configs, from Rust
    plan        hosts and daemons of a lab, decided before anything is created
    configs     what the lab sets in each daemon's configuration
    netns       namespaces, veths, bridges, the internet's routing
    daemons     starting, watching and stopping daemon processes
    cu          the Central Unit's files (pon-cu init)
    linkemu     the link emulator: its sites and run-time changes (impair)
    lab         Lab: the state file and the lifecycle (up, down, add-site, stop, start)
    cli         commands and arguments
"""
