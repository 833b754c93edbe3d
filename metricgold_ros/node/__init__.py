"""The ROS 2 adapter: the rclpy node and its helpers (the only package here importing rclpy,
with :mod:`metricgold_ros.synthetic`'s camera process)."""
