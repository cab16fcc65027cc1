"""`ros2 run edgevlm_ros node`: the node is edgevlm.ros_node's."""

from edgevlm.ros_node import main

if __name__ == "__main__":
    main()
