"""`count_compilations`: how many XLA programs a piece of test code compiles (JAX's backend-compile events)."""

from collections.abc import Callable

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"


def count_compilations(fn: Callable[[], object]) -> int:
    """Runs ``fn()`` and returns how many programs it compiled (each new shape of an eager op is one); a program
    found in the persistent compilation cache counts too."""
    events = []

    def listener(event, duration, **kwargs):
        if event == _EVENT:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)
