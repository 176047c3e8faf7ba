# Locate the onnxruntime C API headers (API version 17).
#
# -DFGQ_ORT_INCLUDE_DIR=<dir> (dir/onnxruntime/core/session/onnxruntime_c_api.h)
# uses local headers (offline builds). Otherwise the amd-quark 0.13 wheel (MIT)
# is downloaded with the machine's configured pip index into the build tree,
# once, and only its onnxruntime 1.17.0 header files are extracted.

set(FGQ_ORT_INCLUDE_DIR "" CACHE PATH "Folder holding onnxruntime/core/session/onnxruntime_c_api.h")
set(_fgq_header_rel "onnxruntime/core/session/onnxruntime_c_api.h")

if(FGQ_ORT_INCLUDE_DIR)
  if(NOT EXISTS "${FGQ_ORT_INCLUDE_DIR}/${_fgq_header_rel}")
    message(FATAL_ERROR "FGQ_ORT_INCLUDE_DIR=${FGQ_ORT_INCLUDE_DIR} has no ${_fgq_header_rel}")
  endif()
  set(FGQ_ORT_HEADERS "${FGQ_ORT_INCLUDE_DIR}")
else()
  set(_fgq_dest "${CMAKE_BINARY_DIR}/_deps/ort_headers")
  if(NOT EXISTS "${_fgq_dest}/${_fgq_header_rel}")
    find_package(Python COMPONENTS Interpreter REQUIRED)
    set(_fgq_dl "${CMAKE_BINARY_DIR}/_deps/download")
    file(GLOB _fgq_wheel "${_fgq_dl}/amd_quark-0.13-*.whl")
    if(NOT _fgq_wheel)
      message(STATUS "fgq: downloading amd-quark==0.13 for the onnxruntime 1.17 API headers")
      execute_process(
        COMMAND "${Python_EXECUTABLE}" -m pip download --no-deps --only-binary=:all: amd-quark==0.13 -d "${_fgq_dl}"
        RESULT_VARIABLE _fgq_rc OUTPUT_QUIET ERROR_VARIABLE _fgq_err)
      file(GLOB _fgq_wheel "${_fgq_dl}/amd_quark-0.13-*.whl")
      if(NOT _fgq_rc EQUAL 0 OR NOT _fgq_wheel)
        message(FATAL_ERROR "fgq: could not download amd-quark==0.13 (${_fgq_err}).\n"
                            "Offline: pass -DFGQ_ORT_INCLUDE_DIR=<folder with onnxruntime/core/session/onnxruntime_c_api.h>")
      endif()
    endif()
    list(GET _fgq_wheel 0 _fgq_wheel)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/extract_ort_headers.py" "${_fgq_wheel}" "${_fgq_dest}"
      RESULT_VARIABLE _fgq_rc)
    if(NOT _fgq_rc EQUAL 0 OR NOT EXISTS "${_fgq_dest}/${_fgq_header_rel}")
      message(FATAL_ERROR "fgq: extracting the onnxruntime headers from ${_fgq_wheel} failed")
    endif()
  endif()
  set(FGQ_ORT_HEADERS "${_fgq_dest}")
endif()
message(STATUS "fgq: onnxruntime headers in ${FGQ_ORT_HEADERS}")
