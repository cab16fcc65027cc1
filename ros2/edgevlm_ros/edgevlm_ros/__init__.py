"""The edgevlm node's ROS 2 package: its code is edgevlm.ros_node (pip install edgevlm)."""
