#include "client/cpp/eval/samples_io.h"

#include <unistd.h>

#include <cstring>
#include <fstream>

#include "gtest/gtest.h"

namespace vqkv::eval {
namespace {

TEST(SamplesIoTest, SafetensorsRoundTrip) {
  kernels::KvSamples s;
  s.layers = 2;
  s.kv_heads = 1;
  s.head_dim = 2;
  s.q_heads = 2;
  s.k = {{1, 2, 3, 4}, {5, 6, 7, 8}};
  s.v = {{-1, -2, -3, -4}, {-5, -6, -7, -8}};
  s.q = {std::vector<float>(8, 1.f), std::vector<float>(8, 2.f)};
  s.seq_lens = {1, 1};
  const std::string path =
      ::testing::TempDir() + "/samples_" + std::to_string(getpid()) + ".safetensors";
  ASSERT_TRUE(SaveSamples(s, path).ok());
  auto back = LoadSamples(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->k, s.k);
  EXPECT_EQ(back->v, s.v);
  EXPECT_EQ(back->q, s.q);
  EXPECT_EQ(back->q_heads, 2);
  EXPECT_EQ(back->seq_lens, s.seq_lens);
  unlink(path.c_str());
}

TEST(SamplesIoTest, NpyAndItsErrors) {
  // [layers=1, 2, n=2, heads=1, dim=2] float32
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 2, 1, 2), }";
  while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::string file = std::string("\x93NUMPY\x01\x00", 8);
  file.push_back(static_cast<char>(header.size() & 0xff));
  file.push_back(static_cast<char>(header.size() >> 8));
  file += header;
  const float data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  file.append(reinterpret_cast<const char*>(data), sizeof data);
  const std::string path = ::testing::TempDir() + "/samples_" + std::to_string(getpid()) + ".npy";
  std::ofstream(path, std::ios::binary) << file;
  auto s = LoadSamples(path);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->k[0], (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(s->v[0], (std::vector<float>{5, 6, 7, 8}));
  std::ofstream(path, std::ios::binary) << file.substr(0, file.size() - 4);
  EXPECT_EQ(LoadSamples(path).status().code(), absl::StatusCode::kInvalidArgument);
  std::ofstream(path, std::ios::binary) << "not numpy";
  EXPECT_EQ(LoadSamples(path).status().code(), absl::StatusCode::kInvalidArgument);
  unlink(path.c_str());
  EXPECT_EQ(LoadSamples("/nonexistent.safetensors").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace vqkv::eval
