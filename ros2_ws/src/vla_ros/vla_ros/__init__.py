"""ROS 2 deployment of the flow VLA policy: camera, policy, safety filter, eval manager, teleop and sim twin nodes.

Pure-Python cores (safety, actions, trials, journal) import no ROS, so they are testable on any host; the
`*_node` modules wrap them in rclpy nodes that use standard messages only.
"""
