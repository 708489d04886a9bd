"""Declaring a node's parameters in one table, and turning bad values into one-line errors."""

from __future__ import annotations

import sys
import threading
from typing import Any

from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from policy_runtime.errors import UserError

# What a node raises for bad configuration: one line on stderr and exit code 2, never a traceback.
CONFIG_ERRORS = (ValueError, UserError)


class ParamError(ValueError):
    """A parameter value the node cannot work with; the message names the parameter."""


_EMPTY_TYPES = {"str[]": Parameter.Type.STRING_ARRAY, "float[]": Parameter.Type.DOUBLE_ARRAY,
                "int[]": Parameter.Type.INTEGER_ARRAY}


def declare(node: Node, table: dict[str, Any]) -> dict[str, Any]:
    """Declare every parameter of `table` (name -> default) and return their values.

    An empty-list default must be written as the type name ("str[]", "float[]", "int[]"), because ROS cannot
    infer an array type from an empty list.
    """
    values = {}
    for name, default in table.items():
        if isinstance(default, str) and default in _EMPTY_TYPES:
            node.declare_parameter(name, _EMPTY_TYPES[default])
            try:
                values[name] = list(node.get_parameter(name).value)
            except ParameterUninitializedException:
                values[name] = []
        else:
            node.declare_parameter(name, default)
            v = node.get_parameter(name).value
            values[name] = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v
    return values


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ParamError(message)


# Set by end_spin: the process's spin loop stops at its next turn (a process spins one executor).
_END_SPIN = threading.Event()


def spin_until_shutdown(executor) -> None:
    """Spin until Ctrl-C, an rclpy shutdown or `end_spin`; returns once no callback runs any more.

    The caller destroys the nodes next. A callback still running on a worker thread would then fail on a
    destroyed entity, and rclpy prints that at exit as "The following exception was never retrieved".
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException

    _END_SPIN.clear()
    try:
        while rclpy.ok() and not _END_SPIN.is_set():
            executor.spin_once(timeout_sec=1.0)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # A shutdown that lands while the executor builds its wait set (Ctrl-C) raises RCLError "context is not
        # valid" instead of ExternalShutdownException: a normal end.
        if rclpy.ok():
            raise
    finally:
        stop_executor(executor)


def stop_executor(executor) -> None:
    """executor.shutdown(), once the callbacks already handed to its worker threads have returned.

    MultiThreadedExecutor.shutdown destroys the executor's guard condition before it joins its thread pool, and
    a callback that ends in between fails on the destroyed guard. Joining the pool first (rclpy has no public
    call for it) closes that window; nothing submits to the pool once the spin loop has returned.
    """
    pool = getattr(executor, "_executor", None)
    if pool is not None:
        pool.shutdown(wait=True)
    executor.shutdown()


def end_spin(node: Node) -> None:
    """End the spin this process runs (the eval manager's exit_when_done), from any thread.

    Not rclpy.shutdown(): that destroys every node at once, under callbacks still running on worker threads.
    The spin loop stops instead, and spin_until_shutdown waits for those callbacks before anything is destroyed.
    """
    _END_SPIN.set()
    if node.executor is not None:
        node.executor.wake()


def run_node_main(factory, args: list[str] | None = None) -> int:
    """Entry point body shared by every node: init, build, spin; a ParamError is one line and exit 2.

    One node per process spins on a SingleThreadedExecutor: the node's callbacks share its default (mutually
    exclusive) callback group, so a thread pool would run them one at a time anyway, and its hand-offs cost the
    process GIL time that the policy node's control tick thread then waits for (benchmarks/ros_stack.py).
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    rclpy.init(args=args if args is not None else sys.argv)
    try:
        node = factory()
    except CONFIG_ERRORS as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        spin_until_shutdown(executor)
    finally:
        close = getattr(node, "close", None)
        if close is not None:
            close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
