# Compiler settings shared by the project's own targets. Generated code (protobuf) does not use
# vqkv_target_defaults and so is exempt from -Werror.
if(VQKV_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()

function(vqkv_target_defaults target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror -Wno-sign-compare -Wno-psabi>)
  if(CMAKE_BUILD_TYPE MATCHES "Rel")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-O3 -march=x86-64-v3>)
  endif()
endfunction()
