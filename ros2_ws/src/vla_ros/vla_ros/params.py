"""Declaring a node's parameters in one table, and turning bad values into one-line errors."""

from __future__ import annotations

import sys
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


def spin_until_shutdown(executor) -> None:
    """Spin until Ctrl-C or an rclpy shutdown, including one a node requests from a callback."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # A shutdown that lands while the executor builds its wait set (the eval manager ends the session from a
        # callback) raises RCLError "context is not valid" instead of ExternalShutdownException: a normal end.
        if rclpy.ok():
            raise


def run_node_main(factory, args: list[str] | None = None) -> int:
    """Entry point body shared by every node: init, build, spin; a ParamError is one line and exit 2."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    rclpy.init(args=args if args is not None else sys.argv)
    try:
        node = factory()
    except CONFIG_ERRORS as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor()
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
