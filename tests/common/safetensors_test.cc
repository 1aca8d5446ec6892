#include "common/safetensors.h"

#include <cstring>

#include "gtest/gtest.h"

namespace vqkv {
namespace {

std::string Sample() {
  SafetensorsWriter w;
  const float a[6] = {1, 2, 3, 4, 5, 6};
  w.AddF32("a", {2, 3}, a);
  w.AddRaw("b", "F16", {2}, std::string("\x00\x3c\x00\x40", 4));  // 1.0, 2.0
  w.SetMetadata("note", "hello");
  return w.Serialize();
}

TEST(SafetensorsTest, RoundTrip) {
  auto f = SafetensorsFile::Parse(Sample(), "mem");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->metadata().at("note"), "hello");
  auto a = f->ReadFloat("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  auto b = f->ReadFloat("b");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, (std::vector<float>{1, 2}));
  EXPECT_EQ(f->Info("a")->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f->ReadFloat("missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, RejectsDamage) {
  const std::string good = Sample();
  // Truncated data section.
  EXPECT_EQ(SafetensorsFile::Parse(good.substr(0, good.size() - 3), "t").status().code(),
            absl::StatusCode::kInvalidArgument);
  // Header length past the end.
  std::string big = good;
  const uint64_t n = 1ull << 40;
  std::memcpy(big.data(), &n, 8);
  EXPECT_EQ(SafetensorsFile::Parse(big, "t").status().code(), absl::StatusCode::kInvalidArgument);
  // Garbled JSON.
  std::string garbled = good;
  garbled[9] = '#';
  EXPECT_EQ(SafetensorsFile::Parse(garbled, "t").status().code(),
            absl::StatusCode::kInvalidArgument);
  // Too short.
  EXPECT_EQ(SafetensorsFile::Parse("abc", "t").status().code(), absl::StatusCode::kInvalidArgument);
  // Shape disagreeing with the byte range.
  SafetensorsWriter w;
  w.AddRaw("x", "F32", {3}, std::string(8, '\0'));
  auto st = SafetensorsFile::Parse(w.Serialize(), "t").status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("'x'"), absl::string_view::npos) << st;
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  EXPECT_EQ(SafetensorsFile::Open("/nonexistent/x.safetensors").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace vqkv
