"""observe: the guard as it is, and everything people and scripts see of it.

state (the read model of the pins), holders (who holds a reserved port, squatters),
monitor (refused binds from the ring buffer), journal, display (every output format of
every command).

Import rule: observe reads pins and slots (guard.kernel.pins, .slots, .layout, .libbpf,
.host) and never imports the apply transaction (guard.kernel.apply); it may import
guard.policy for settings. Nothing in policy or kernel imports observe.
"""
