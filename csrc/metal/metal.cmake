# csrc/metal/metal.cmake — the Metal backend, included by the top-level CMakeLists.txt on
# APPLE after the core library target `attnproto_core` exists:
#
#   if(APPLE)
#     include(${CMAKE_CURRENT_SOURCE_DIR}/csrc/metal/metal.cmake)
#   endif()
#
# Adds metal_backend.mm (Objective-C++, ARC) to attnproto_core, links Metal and Foundation,
# and builds every shaders/metal/*.metal into attnproto.metallib with xcrun
# (.metal -> .air -> .metallib, MSL 3.1), installed next to the package's shader sources at
# ${ATTNPROTO_PACKAGE_DIR}/shaders/metal/attnproto.metallib.

if(NOT TARGET attnproto_core)
  message(FATAL_ERROR "metal.cmake: include it after add_library(attnproto_core ...)")
endif()

enable_language(OBJCXX)

set(ATTNPROTO_METAL_HOST_DIR ${CMAKE_CURRENT_LIST_DIR})
get_filename_component(ATTNPROTO_REPO_DIR "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)
set(ATTNPROTO_SHADER_SRC_DIR ${ATTNPROTO_REPO_DIR}/shaders)
# Package directory inside the wheel / install prefix (scikit-build-core installs relative
# to the wheel root).
set(ATTNPROTO_PACKAGE_DIR "attnproto" CACHE STRING "install directory of the attnproto package")
# MSL version the kernels need (simdgroup_matrix with bfloat).
set(ATTNPROTO_METAL_STD "metal3.1")

target_sources(attnproto_core PRIVATE ${ATTNPROTO_METAL_HOST_DIR}/metal_backend.mm)
set_source_files_properties(${ATTNPROTO_METAL_HOST_DIR}/metal_backend.mm PROPERTIES
  COMPILE_OPTIONS "-fobjc-arc;-Wall;-Werror")
target_include_directories(attnproto_core PRIVATE
  ${ATTNPROTO_METAL_HOST_DIR}
  ${ATTNPROTO_SHADER_SRC_DIR}/metal
  ${ATTNPROTO_SHADER_SRC_DIR})
target_link_libraries(attnproto_core PUBLIC "-framework Metal" "-framework Foundation")
target_compile_definitions(attnproto_core PUBLIC ATTNPROTO_WITH_METAL=1)

# ---- metallib ----
find_program(ATTNPROTO_XCRUN xcrun REQUIRED)
file(GLOB ATTNPROTO_METAL_SOURCES CONFIGURE_DEPENDS ${ATTNPROTO_SHADER_SRC_DIR}/metal/*.metal)
file(GLOB ATTNPROTO_METAL_HEADERS CONFIGURE_DEPENDS
  ${ATTNPROTO_SHADER_SRC_DIR}/metal/*.h ${ATTNPROTO_SHADER_SRC_DIR}/common/*.h)
set(ATTNPROTO_METAL_BUILD_DIR ${CMAKE_CURRENT_BINARY_DIR}/metal)
file(MAKE_DIRECTORY ${ATTNPROTO_METAL_BUILD_DIR})

set(ATTNPROTO_AIR_FILES "")
foreach(src IN LISTS ATTNPROTO_METAL_SOURCES)
  get_filename_component(stem ${src} NAME_WE)
  set(air ${ATTNPROTO_METAL_BUILD_DIR}/${stem}.air)
  add_custom_command(
    OUTPUT ${air}
    COMMAND ${ATTNPROTO_XCRUN} -sdk macosx metal -std=${ATTNPROTO_METAL_STD} -Wall -Werror
            -I ${ATTNPROTO_SHADER_SRC_DIR}/metal -I ${ATTNPROTO_SHADER_SRC_DIR}
            -c ${src} -o ${air}
    DEPENDS ${src} ${ATTNPROTO_METAL_HEADERS}
    COMMENT "MSL ${stem}.metal -> ${stem}.air"
    VERBATIM)
  list(APPEND ATTNPROTO_AIR_FILES ${air})
endforeach()

set(ATTNPROTO_METALLIB ${ATTNPROTO_METAL_BUILD_DIR}/attnproto.metallib)
add_custom_command(
  OUTPUT ${ATTNPROTO_METALLIB}
  COMMAND ${ATTNPROTO_XCRUN} -sdk macosx metallib ${ATTNPROTO_AIR_FILES} -o ${ATTNPROTO_METALLIB}
  DEPENDS ${ATTNPROTO_AIR_FILES}
  COMMENT "metallib attnproto.metallib"
  VERBATIM)
add_custom_target(attnproto_metallib ALL DEPENDS ${ATTNPROTO_METALLIB})
add_dependencies(attnproto_core attnproto_metallib)

install(FILES ${ATTNPROTO_METALLIB} DESTINATION ${ATTNPROTO_PACKAGE_DIR}/shaders/metal)
