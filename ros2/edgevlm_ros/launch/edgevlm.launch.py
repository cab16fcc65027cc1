"""ros2 launch edgevlm_ros edgevlm.launch.py [params:=FILE.yaml]

Starts the edgevlm node with its parameters from a YAML file (default: this package's config/edgevlm.yaml; set
`bundle` there, or pass your own file)."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default = os.path.join(get_package_share_directory("edgevlm_ros"), "config", "edgevlm.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("params", default_value=default, description="The node's parameters (YAML)."),
        Node(package="edgevlm_ros", executable="node", name="edgevlm", output="screen",
             parameters=[LaunchConfiguration("params")]),
    ])
