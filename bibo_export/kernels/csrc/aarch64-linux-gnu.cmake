# CMake toolchain for Debian's aarch64 cross compiler (gcc/g++-aarch64-linux-gnu), for the
# kernel library and any other small program:
#   cmake -S <source> -B <build> \
#         -DCMAKE_TOOLCHAIN_FILE=bibo_export/kernels/csrc/aarch64-linux-gnu.cmake
# Its programs run on Arm Linux, or here under qemu-user (package qemu-user).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# The target's headers and libraries live in /usr/aarch64-linux-gnu, which the compiler
# searches on its own: it is configured with sysroot /, and the target's libc.so names its
# files by absolute path, so CMAKE_SYSROOT (--sysroot) would break every link. It is instead
# the only place find_library, find_path and find_package look; find_program looks on the
# host, whose tools the build runs.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
