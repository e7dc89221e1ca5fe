#include <gtest/gtest.h>

#include <random>

#include "tmoe/error.hpp"
#include "tmoe/routing.hpp"

using tmoe::make_routing_plan;

namespace {

// Checks the plan's invariants against expert_ids directly.
void expect_consistent(const tmoe::RoutingPlan& plan, const std::vector<int32_t>& ids) {
  ASSERT_EQ(plan.offsets.size(), size_t(plan.experts + 1));
  EXPECT_EQ(plan.offsets[0], 0);
  for (int e = 0; e < plan.experts; ++e) EXPECT_EQ(plan.offsets[e + 1] - plan.offsets[e], plan.counts[e]);
  for (int e = 0; e < plan.experts; ++e) {
    int32_t last = -1;
    for (int32_t s = plan.offsets[e]; s < plan.offsets[e + 1]; ++s) {
      EXPECT_EQ(ids[plan.order[s]], e);
      EXPECT_GT(plan.order[s], last) << "order must be stable";
      last = plan.order[s];
      EXPECT_EQ(plan.inverse[plan.order[s]], s);
    }
  }
  for (size_t p = 0; p < ids.size(); ++p) EXPECT_EQ(ids[p] == -1, plan.inverse[p] == -1);
}

}  // namespace

TEST(Routing, HandComputed) {
  // T=3, k=2: pairs 0..5 -> experts 2,0 | 2,1 | 0,2
  const std::vector<int32_t> ids = {2, 0, 2, 1, 0, 2};
  const auto plan = make_routing_plan(ids, 3, 2, 4);
  EXPECT_EQ(plan.counts, (std::vector<int32_t>{2, 1, 3, 0}));
  EXPECT_EQ(plan.offsets, (std::vector<int32_t>{0, 2, 3, 6, 6}));
  EXPECT_EQ(plan.order, (std::vector<int32_t>{1, 4, 3, 0, 2, 5}));
  EXPECT_EQ(plan.inverse, (std::vector<int32_t>{3, 0, 4, 2, 1, 5}));
}

TEST(Routing, AllOnOneExpertAndUnusedExperts) {
  const std::vector<int32_t> ids(17 * 3, 5);
  const auto plan = make_routing_plan(ids, 17, 3, 8);
  EXPECT_EQ(plan.counts[5], 51);
  for (int e = 0; e < 8; ++e) if (e != 5) EXPECT_EQ(plan.counts[e], 0);
  expect_consistent(plan, ids);
}

TEST(Routing, MinusOneIsSkipped) {
  const std::vector<int32_t> ids = {-1, 1, 0, -1};
  const auto plan = make_routing_plan(ids, 2, 2, 2);
  EXPECT_EQ(plan.routed_pairs(), 2);
  EXPECT_EQ(plan.order, (std::vector<int32_t>{2, 1}));
  expect_consistent(plan, ids);
}

TEST(Routing, SingleToken) {
  const std::vector<int32_t> ids = {3};
  const auto plan = make_routing_plan(ids, 1, 1, 4);
  EXPECT_EQ(plan.order, (std::vector<int32_t>{0}));
  EXPECT_EQ(plan.offsets, (std::vector<int32_t>{0, 0, 0, 0, 1}));
}

TEST(Routing, BadIdsAreClearErrors) {
  for (int32_t bad : {4, -2, 1000000}) {
    const std::vector<int32_t> ids = {0, bad};
    try {
      make_routing_plan(ids, 1, 2, 4);
      FAIL() << "id " << bad << " accepted";
    } catch (const tmoe::Error& e) {
      EXPECT_EQ(e.kind(), tmoe::ErrorKind::bad_input);
      EXPECT_NE(std::string(e.what()).find("token 0, slot 1"), std::string::npos) << e.what();
    }
  }
}

TEST(Routing, RandomMatchesInvariants) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> expert(-1, 15);
  std::vector<int32_t> ids(130 * 8);
  for (auto& id : ids) id = expert(rng);
  expect_consistent(make_routing_plan(ids, 130, 8, 16), ids);
}
