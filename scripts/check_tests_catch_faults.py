"""Do the tests catch the faults they name? Each entry plants one fault (a code change) in a
copy of the tree and runs the tests that must then fail; prints one line per fault. Not part of
the suite (about 3 minutes); run it after changing a test or the code it guards:

    python scripts/check_tests_catch_faults.py [FAULT ...]

Each fault is (name, file, exact old text, new text, tests that must fail). An old text that no
longer occurs is reported STALE and fails the run; tests/test_faults_list.py checks every entry
against the code in the suite, so the list cannot silently drift from it."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1])
FAULTS = [
 ("probes_unpaired", "scripts/compare_probes.py", "    boot = {k: v[0][resample].mean(1) for k, v in files.items()}",
  "    boot = {k: v[0][np.random.default_rng(len(k)).integers(0, len(A), size=(a.n_boot, len(A)))].mean(1) for k, v in files.items()}",
  "tests/test_evaluate.py::test_compare_probes_pairs_two_policies_as_the_probe_curve_does"),
 ("probe_exclude_ignored", "scripts/compare_probes.py", "rows = [r for r in rows if (r[\"uid\"], r[\"iid\"]) not in exclude]", "rows = [r for r in rows if (r[\"uid\"], r[\"iid\"]) not in exclude or True]",
  "tests/test_evaluate.py::test_compare_probes_exclude_leaves_out_the_named_prompts"),
 ("cause_rule_reads_totals", "scripts/cause_readable.py", "\"net\": int(np.argmax([abs(a - b) for a, b in c]))", "\"net\": int(np.argmax([abs(a + b) for a, b in c]))",
  "tests/test_data_prep.py::test_cause_readable_rules_read_the_prompts_counts_and_refuse_test"),
 ("form_prefix_dropped", "scripts/explainer_form.py", "common.build_prompt(t, items, popt[\"style\"], q), prefix)", "common.build_prompt(t, items, popt[\"style\"], q), \"\")",
  "tests/test_llm_stages.py::test_explainer_form_generates_each_prompt_variant_and_keeps_its_prefix"),
 ("explainer_prefix_ignored", "llm.py", "        return self.encode(self._chat(prompt, prefix))", "        return self.encode(self._chat(prompt))",
  "tests/test_llm_stages.py::test_explainer_form_generates_each_prompt_variant_and_keeps_its_prefix"),
 ("cause_learned_rule_reversed", "scripts/cause_readable.py", "\"learned\": 0 if clf.predict([features(c)])[0] else 1}", "\"learned\": 1 if clf.predict([features(c)])[0] else 0}",
  "tests/test_data_prep.py::test_cause_readable_rules_read_the_prompts_counts_and_refuse_test"),
 ("cause_taste_swapped", "scripts/cause_information.py", "(y, p, c[cause], next(v for g, v in c.items() if g != cause))", "(y, p, next(v for g, v in c.items() if g != cause), c[cause])",
  "tests/test_data_prep.py::test_cause_information_pairs_the_cause_with_the_other_genre_of_2_genre_items"),
 ("cause_smallest_taste", "data_prep.py", "int(np.argmax(np.abs(contrib)))", "int(np.argmin(np.abs(contrib)))",
  "tests/test_data_prep.py::test_synthetic_truth_gives_each_genre_taste_and_the_cause_is_the_largest"),
 ("cause_cut_uncut", "scripts/reward_templates.py", "cut(out[k]) for k in (\"profile\", \"target_genres\", \"cause\", \"other\")", "(cut(out[k]) if k == \"profile\" else out[k]) for k in (\"profile\", \"target_genres\", \"cause\", \"other\")",
  "tests/test_llm_stages.py::test_reward_templates_cut_every_statement_to_the_same_budget"),
 ("upper_logprob_shift", "llm_reuse.py", "cols.to(self.device) - 1], head.weight,", "cols.to(self.device)], head.weight,",
  "tests/test_rl_loop.py::test_explainer_top_layers_from_cached_lower_states_equal_the_full_forward"),
 ("ppo_states_misaligned", "stage3_rl.py", "[states[i] for i in pick]", "[states[i] for i in pick[::-1]]",
  "tests/test_rl_loop.py::test_ppo_with_top_layer_lora_is_the_full_forward_update"),
 ("embedding_pad_grad", "ctr_ops.py", "    return out if padding_idx is None else out * (idx != padding_idx).unsqueeze(-1)\n", "    return out\n",
  "tests/test_train_ctr.py::test_embedding_by_index_select_equals_nn_embedding"),
 ("merged_bf16_generation", "stage2_reward.py", "    with bundle.use(adapter):\n        for a in range(0, len(prompt_ids), args.gen_batch):",
  "    import contextlib\n    from peft.tuners.lora import LoraLayer\n    @contextlib.contextmanager\n    def merged():\n        if adapter is None:\n            with bundle.use(None):\n                yield\n            return\n        bundle.model.set_adapter(adapter)\n        layers = [m for m in bundle.model.modules() if isinstance(m, LoraLayer)]\n        saved = [m.get_base_layer().weight.data.clone() for m in layers]\n        with torch.no_grad():\n            bundle.model.merge_adapter([adapter])\n        try:\n            yield\n        finally:\n            with torch.no_grad():\n                for m, w in zip(layers, saved):\n                    m.get_base_layer().weight.data.copy_(w)\n                    m.merged_adapters.clear()\n    with merged():\n        for a in range(0, len(prompt_ids), args.gen_batch):",
  "tests/test_rl_loop.py::test_bf16_sampling_path_logprobs_equal_the_trained_forward tests/test_rl_loop.py::test_bf16_greedy_text_is_the_unmerged_policy_argmax"),
 ("logp_ignores_temperature", "stage2_reward.py", "completion_logprobs_grouped(prompt_ids, completion_ids, batch, temperature)", "completion_logprobs_grouped(prompt_ids, completion_ids, batch)",
  "tests/test_rl_loop.py::test_sampled_token_frequencies_match_stored_logprobs"),
 ("logp_ignores_suppression", "llm.py", "                b[self.suppress] = float(\"-inf\")", "                pass",
  "tests/test_rl_loop.py::test_sampled_token_frequencies_match_stored_logprobs"),
 ("logp_rounded", "stage2_reward.py", "    return [x.tolist() for x in lps]", "    return [[round(v, 6) for v in x.tolist()] for x in lps]",
  "tests/test_rl_loop.py::test_rollouts_store_float32_logprobs_of_the_sampler"),
 ("rollouts_from_train", "stage2_reward.py", "scorer, rl = reward_inputs(args, paths, \"rl\")", "scorer, rl = reward_inputs(args, paths, \"train\")",
  "tests/test_rl_loop.py::test_rollout_prompts_come_from_rl_only"),
 ("no_partition", "data_prep.py", "    splits.update(carve_prompt_splits(splits[\"train\"], args.rl_frac, args.probe_frac, args.seed))",
  "    splits.update(rl=list(splits['train']), probe=list(splits['train']))",
  "tests/test_rl_loop.py::test_rl_and_probe_prompts_are_never_reward_model_training_samples"),
 ("probe_seed_per_tag", "stage2_reward.py", "res = sample_and_score(bundle, actor, samples, items, args, args.seed * SEED_STRIDE,",
  "res = sample_and_score(bundle, actor, samples, items, args, args.seed * SEED_STRIDE + len(tag),",
  "tests/test_rl_loop.py::test_probe_same_prompts_for_every_policy_and_a_curve_with_cis"),
 ("base_probe_logps", "stage2_reward.py", "popt, world, logps=actor is not None)", "popt, world)",
  "tests/test_rl_loop.py::test_base_probe_skips_the_log_prob_passes"),
 ("k3_reversed", "stage3_rl.py", "    d = logp_ref - logp\n", "    d = logp - logp_ref\n", "tests/test_rl_loop.py::test_k3_kl_hand_computed_direction"),
 ("padding_not_masked", "stage3_rl.py", "    logp = torch.where(keep, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))\n    logp_old = torch.where(keep, logp_old, logp.detach())\n    logp_ref = torch.where(keep, logp_ref, logp.detach())\n", "",
  "tests/test_rl_loop.py::test_ppo_loss_ignores_whatever_padded_slots_hold"),
 ("dropout_on", "stage3_rl.py", "    bundle.model.eval()  # [ours] no LoRA dropout", "    bundle.model.train()  # [ours] no LoRA dropout",
  "tests/test_rl_loop.py::test_first_ppo_step_ratio_is_one_at_a_later_iteration_with_dropout"),
 ("adamw_default_decay", "stage3_rl.py", "opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)", "opt = torch.optim.AdamW(params, lr=args.lr)",
  "tests/test_rl_loop.py::test_ppo_without_signal_leaves_the_policy_unchanged"),
 ("force_deletes_first", "common.py", "            aside = tmp / f\"{path.name}.old\"\n            os.replace(path, aside)\n", "            aside = tmp / f\"{path.name}.old\"\n            shutil.rmtree(path); os.makedirs(aside)\n",
  "tests/test_rl_loop.py::test_force_replacing_a_folder_never_leaves_neither"),
 ("ppo_rows_averaged", "evaluate.py", "            last[int(r[\"iter\"])] = r\n", "            last[int(r[\"iter\"])] = dict(r, kl=(r['kl'] + last[int(r['iter'])]['kl']) / 2) if int(r['iter']) in last else r\n",
  "tests/test_rl_loop.py::test_rerun_rows_are_not_double_counted"),
 ("patience_gt", "common.py", "        return self.bad >= self.patience", "        return self.bad > self.patience",
  "tests/test_rl_loop.py::test_early_stopping_means_the_same_in_every_stage"),
 ("warm_start_text_random", "train_ctr.py", "        own[\"text_proj.1.weight\"].zero_()\n        own[\"text_proj.1.bias\"].zero_()\n", "        pass\n",
  "tests/test_train_ctr.py::test_text_emb_and_warm_start"),
 ("ctr_labels_shuffled", "train_ctr.py", "    y = torch.from_numpy(feats[\"train\"].labels)",
  "    y = torch.from_numpy(np.random.default_rng(0).permutation(feats[\"train\"].labels))",
  "tests/test_train_ctr.py::test_train_and_round_trip"),
 ("prefix_positions_not_offset", "llm_reuse.py", "        pos = pmask.sum(1)[:, None] + torch.arange(S, device=self.device)[None]",
  "        pos = pmask.shape[1] + torch.arange(S, device=self.device)[None].expand(len(suffixes), S)",
  "tests/test_llm_stages.py::test_prefix_kv_reuse_equals_separate_forwards"),
 ("shared_prefill_wrong_rows", "llm.py", "        return self._prefill([list(k)[:-1] for k in uniq], owner)[0]",
  "        return self._prefill([list(k)[:-1] for k in uniq], sorted(owner, reverse=True))[0]",
  "tests/test_llm_stages.py::test_shared_prefill_samples_what_separate_prefill_samples"),
 ("shuffle_perms_not_resampled", "evaluate.py", "    boot = b[\"p\"] - np.take_along_axis(sh, pick, 1).mean(1)", "    boot = b[\"p\"] - sh.mean(1)",
  "tests/test_evaluate.py::test_shuffle_drop_averages_permutations_and_their_spread_widens_the_ci"),
 ("scorer_view_ignored", "common.py", "    if explanation is not None and view == \"target\":", "    if False:",
  "tests/test_llm_stages.py::test_scorer_target_view_reads_the_explanation_not_the_history"),
 ("scorer_view_not_restored", "llm.py", "                self.scorer_view = saved or scorer_view or \"full\"",
  "                self.scorer_view = scorer_view or \"full\"",
  "tests/test_llm_stages.py::test_scorer_target_view_reads_the_explanation_not_the_history"),
 ("question_not_read", "common.py", "    return {\"style\": a.get(\"prompt_style\", \"items\"), \"question\": a.get(\"question\", \"paper\")}",
  "    return {\"style\": a.get(\"prompt_style\", \"items\"), \"question\": \"paper\"}",
  "tests/test_llm_stages.py::test_explainer_question_is_a_run_option_every_prompt_uses"),
 ("profile_echo_swapped", "stage1_sft.py", "    return [None if x < dropout else profile_echo(r, items, popt, k) if x < dropout + echo\n            else e[\"explanation\"]",
  "    return [None if x < dropout else e[\"explanation\"] if x < dropout + echo\n            else profile_echo(r, items, popt, k)",
  "tests/test_llm_stages.py::test_profile_echo_puts_the_history_lines_in_the_explanation_slot"),
 ("cause_hit_any_named", "explanation_quality.py", "            h.append(c in named and not (named & gs) - {c})", "            h.append(c in named)",
  "tests/test_evaluate.py::test_cause_choice_needs_the_cause_alone_and_echo_baselines"),
 ("upper_layers_off_by_one", "llm_reuse.py", "        return decoder.norm(self._run_layers(h, mask, decoder.layers[first:end]))",
  "        return decoder.norm(self._run_layers(h, mask, decoder.layers[first + 1:end]))",
  "tests/test_llm_stages.py::test_top_layers_from_cached_lower_states_equal_the_full_forward"),
 ("answer_head_ignored", "llm.py", "        if self.active in self.heads:", "        if False:",
  "tests/test_llm_stages.py::test_answer_head_starts_at_the_untuned_answer_is_saved_and_only_the_scorer_uses_it"),
 ("answer_layer_not_truncated", "llm.py", "        cfg.num_hidden_layers = self.depth.get(name, self.n_layers)\n", "        cfg.num_hidden_layers = self.n_layers\n",
  "tests/test_llm_stages.py::test_answer_layer_runs_only_the_layers_below_it_and_is_saved"),
 ("invented_title_never", "explanation_quality.py", "                \"invented\": self.invented(text),", "                \"invented\": False,",
  "tests/test_evaluate.py::test_invented_titles_are_title_like_spans_matching_no_catalogue_title"),
 ("history_sees_same_timestamp", "data_prep.py", "        new_group = new_user.copy()\n        new_group[1:] |= t[1:] != t[:-1]\n",
  "        new_group = np.ones(n, bool)\n", "tests/test_sample_store.py::test_same_samples_as_the_per_row_reference"),
 ("ids_in_code_order", "data_prep.py", "order = np.lexsort((irank, urank, inter.ts))", "order = np.lexsort((inter.iid, inter.uid, inter.ts))", "tests/test_sample_store.py::test_ties_follow_string_order_whatever_the_codes"),
 ("store_history_shifted", "sample_store.py", "zip(c[\"seq_iid\"][lo:hi].tolist(), c[\"seq_label\"][lo:hi].tolist())",
  "zip(c[\"seq_iid\"][lo:hi].tolist(), c[\"seq_label\"][lo + 1:hi + 1].tolist())", "tests/test_sample_store.py::test_same_samples_as_the_per_row_reference"),
 ("features_liked_flipped", "ctr_features.py", "liked = hist_label[c] == 1", "liked = hist_label[c] == 0",
  "tests/test_sample_store.py::test_features_equal_the_per_row_reference"),
 ("gauc_unweighted", "metrics.py", "return float((cnt[both] * a).sum() / cnt[both].sum())", "return float(a.mean())",
  "tests/test_sample_store.py::test_gauc_matches_per_user_roc_auc"),
 ("no_history_label_field", "ctr_models.py", "                self.sign(b[\"hlab\"]).sum(1)]", "                self.sign(b[\"hlab\"]).sum(1) * 0]",
  "tests/test_train_ctr.py::test_every_backbone_reads_the_history_labels_and_emb_reg_applies"),
 ("din_query_part_wrong", "ctr_models.py", "linear(q, wq + wd, first.bias)", "linear(q, wq - wd, first.bias)",
  "tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_pads_attended", "ctr_ops.py", "wk = acc * (h0 + h1)  # 0 on pads", "wk = acc  # 0 on pads",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_sign_columns_swapped", "ctr_models.py", "ws @ S.T], 1)", "ws @ S.flip(0).T], 1)",
  "tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_head_slope_wrong", "ctr_ops.py", "gp = g * w[j] * (one if pre > zero else a)", "gp = g * w[j] * (one if pre > zero else one)",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_head_forward_relu", "ctr_ops.py", "acc += w[j] * (max(pre, zero) + a * min(pre, zero))", "acc += w[j] * max(pre, zero)",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients"),
 ("din_head_slope_grad_lost", "ctr_ops.py", "p_ab[t, 0], p_ab[t, 1] = pa, pb", "p_ab[t, 0], p_ab[t, 1] = zero, pb",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients"),
 ("din_head_query_grad_one_slot", "ctr_ops.py", "                    gQ[s, j] += gp", "                    gQ[s, j] = gp",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients"),
 ("din_pooling_grad_to_keys_lost", "ctr_ops.py", " + att[s, n - s * K] * gpool[s, i]\n", "\n",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_query_grad_wrong_factor", "ctr_ops.py", "gq[s, i] += gX[n, i] * ke[r, i]", "gq[s, i] += gX[n, i] * q[s, i]",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_rows_without_query", "ctr_ops.py", "X[n, i] = q[s, i] * ke[r, i]", "X[n, i] = ke[r, i]",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("bag_mean_not_divided", "ctr_ops.py", "                out[u, i] /= n", "                out[u, i] /= 1",
  "tests/test_ctr_ops.py::test_bag_mean_kernel_equals_the_masked_mean_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("bag_mean_counts_padding", "ctr_ops.py", "            if r > 0:\n                n += 1", "            if r >= 0:\n                n += 1",
  "tests/test_ctr_ops.py::test_bag_mean_kernel_equals_the_masked_mean_values_and_gradients"),
 ("bag_mean_grad_undivided", "ctr_ops.py", "gtable[r, i] += gout[u, i] / n", "gtable[r, i] += gout[u, i]",
  "tests/test_ctr_ops.py::test_bag_mean_kernel_equals_the_masked_mean_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("numba_pool_every_core_under_torchrun", "ctr_ops.py", "if os.environ.get(\"LOCAL_WORLD_SIZE\") and", "if False and",
  "tests/test_ctr_ops.py::test_numba_pool_is_a_share_of_the_cores_under_torchrun"),
 ("dropout_unscaled", "ctr_ops.py", "t(1.0 / (1.0 - p)), t(0),", "t(1.0), t(0),",
  "tests/test_ctr_ops.py::test_relu_dropout_is_inverted_dropout_of_the_relu_seeded_by_torch"),
 ("dropout_rate_inverted", "ctr_ops.py", "_uniform(seed, i * h + j) >= p else zero", "_uniform(seed, i * h + j) < p else zero",
  "tests/test_ctr_ops.py::test_relu_dropout_is_inverted_dropout_of_the_relu_seeded_by_torch"),
 ("dropout_mask_shared", "ctr_ops.py", "keep = scale if _uniform(seed, i * h + j)", "keep = scale if _uniform(seed, j)",
  "tests/test_ctr_ops.py::test_relu_dropout_is_inverted_dropout_of_the_relu_seeded_by_torch"),
 ("hsign_swapped", "ctr_features.py", "hsign[s, k, 1 if liked else 0] = 1.0", "hsign[s, k, 0 if liked else 1] = 1.0",
  "tests/test_ctr_ops.py::test_batch_sign_one_hot_and_distinct_items_match_the_integer_fields"),
 ("distinct_rank_off_by_one", "ctr_features.py", "        rank[c] = U\n        U += seen[c]\n", "        U += seen[c]\n        rank[c] = U\n",
  "tests/test_ctr_ops.py::test_batch_distinct_items_are_np_unique_with_inverse_for_any_thread_count tests/test_sample_store.py::test_features_equal_the_per_row_reference"),
 ("batch_history_first_slots", "ctr_features.py", "first = max(lo[j], hi[j] - K)", "first = lo[j]",
  "tests/test_sample_store.py::test_features_equal_the_per_row_reference"),
 ("din_item_part_dropped", "ctr_ops.py", "P[n, j] + Pk[r, j] + Q[s, j]", "P[n, j] + Q[s, j]",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_item_part_grad_lost", "ctr_ops.py", "        gke.addmm_(gPk, Wk)", "        pass",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_item_grads_overwrite", "ctr_ops.py", "gPk[u, j] += gpre[n, j]", "gPk[u, j] = gpre[n, j]",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients tests/test_train_ctr.py::test_din_attention_by_parts_equals_the_concatenated_unit"),
 ("din_sign_weight_grad_wrong", "ctr_ops.py", "p_ws[t, 1, j] += gp * h1", "p_ws[t, 1, j] += gp * h0",
  "tests/test_ctr_ops.py::test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients"),
 ("tower_dtype_ignored", "ctr_models.py", "            h = lin(x) if dt == x.dtype else", "            h = lin(x) if True else",
  "tests/test_train_ctr.py::test_tower_dtype_bfloat16_is_the_float32_tower_to_bf16_rounding"),
 ("tower_weights_rounded_to_bf16", "ctr_models.py", "nn.functional.linear(x.to(dt), lin.weight.to(dt), lin.bias.to(dt))", "nn.functional.linear(x.to(dt), lin.weight.data.copy_(lin.weight.to(dt)).to(dt), lin.bias.to(dt))",
  "tests/test_train_ctr.py::test_tower_dtype_bfloat16_is_the_float32_tower_to_bf16_rounding"),
 ("kernel_times_skip_features", "scripts/bench_ctr_train.py", "for mod in (sys.modules[\"ctr_ops\"], sys.modules[\"ctr_features\"]):", "for mod in (sys.modules[\"ctr_ops\"],):",
  "tests/test_train_ctr.py::test_bench_ctr_train_profile_reports_each_phase_and_the_matmul_share"),
 ("lm_head_input_strided", "llm.py", "        self.lm_head_hook = self.base.get_output_embeddings().register_forward_pre_hook(_contiguous_input)\n", "        self.lm_head_hook = self.base.get_output_embeddings().register_forward_pre_hook(lambda m, a: a)\n",
  "tests/test_rl_loop.py::test_lm_head_reads_a_contiguous_input_when_generating_distinct_prompts"),
 ("scorer_groups_by_prompt_only", "llm_reuse.py", "        if self.scorer_view != \"target\":\n", "        if True:\n",
  "tests/test_llm_stages.py::test_scorer_target_view_shares_each_explanations_forward_across_its_shuffles"),
 ("prediction_chunks_by_prompt", "stage1_sft.py", "    for j, key in enumerate(bundle.scorer_groups(P, E)):", "    for j, key in enumerate(P):",
  "tests/test_llm_stages.py::test_prediction_chunks_keep_each_explanations_inputs_together"),
 ("attn_option_ignored", "llm.py", "        self.base.set_attn_implementation(attn)\n", "        pass\n",
  "tests/test_llm_stages.py::test_eager_attention_gives_the_same_forwards_and_gradients_and_generates_with_sdpa"),
 ("generation_not_on_sdpa", "llm.py", "        with self.attention(\"sdpa\"):  # (the shared prefill", "        with self.attention(self.attn):  # (the shared prefill",
  "tests/test_llm_stages.py::test_eager_attention_gives_the_same_forwards_and_gradients_and_generates_with_sdpa"),
 ("emb_reg_not_in_optimizer", "train_ctr.py", "\"weight_decay\": args.weight_decay + args.emb_reg}", "\"weight_decay\": args.weight_decay}",
  "tests/test_ctr_ops.py::test_emb_reg_as_weight_decay_is_the_l2_penalty_update"),
 ("ddp_grads_not_reduced", "parallel.py", "        dist.all_reduce(flat)\n        total", "        total",
  "tests/test_parallel.py::test_sft_is_the_same_update_with_two_processes tests/test_parallel.py::test_ctr_training_is_the_same_update_with_two_processes tests/test_parallel.py::test_ppo_step_is_the_same_update_with_two_processes"),
 ("ddp_grads_unweighted", "parallel.py", "[torch.tensor([1.0], device=dev)]) * float(n_local)", "[torch.tensor([1.0], device=dev)]) * float(n_local > 0)",
  "tests/test_parallel.py::test_ctr_training_is_the_same_update_with_two_processes"),
 ("chunk_seed_per_rank", "stage2_reward.py", "torch.manual_seed(chunk_seed(seed, c))", "torch.manual_seed(chunk_seed(seed, c % 2 + 10 * world.rank))",
  "tests/test_parallel.py::test_rollouts_and_explanations_are_identical_with_two_processes"),
 ("chunks_by_rank_count", "stage2_reward.py", "    chunks = [list(range(a, min(len(samples), a + args.gen_batch)))\n              for a in range(0, len(samples), args.gen_batch)]",
  "    step = -(-len(samples) // world.size)\n    chunks = [list(range(a, min(len(samples), a + step))) for a in range(0, len(samples), step)]",
  "tests/test_parallel.py::test_rollouts_and_explanations_are_identical_with_two_processes"),
 ("partial_saved_as_output", "stage2_reward.py", "                common.write_jsonl(part, (", "                common.write_jsonl(paths.explanations(args.tag, split), (",
  "tests/test_parallel.py::test_a_killed_rank_stops_the_job_and_leaves_no_partial_output"),
 ("tuner_keeps_slowest", "kernels/triton_impl.py", "best = min(range(len(cands)), key=times.__getitem__)", "best = max(range(len(cands)), key=times.__getitem__)",
  "tests/test_kernels.py::test_autotune_keeps_the_fastest_config_and_caches_it"),
 ("tuner_no_cache", "kernels/triton_impl.py", "    if key in _TUNED:\n        return _TUNED[key][0]\n", "",
  "tests/test_kernels.py::test_autotune_keeps_the_fastest_config_and_caches_it"),
 ("bf16_cuda_upcast", "kernels/triton_impl.py", "        return \"bf16-tensorcore\", dict(DOT_F32=False, IEEE=False)", "        return \"bf16-tensorcore\", dict(DOT_F32=True, IEEE=False)",
  "tests/test_kernels.py::test_precision_paths_are_explicit"),
 ("tuner_over_given_blocks", "kernels/triton_impl.py", "            and all(overrides.get(k) is None for k in", "            and any(overrides.get(k) is None for k in",
  "tests/test_kernels.py::test_the_tuner_runs_on_cuda_only_and_not_over_given_blocks"),
 ("config_drops_last_k_tile", "kernels/triton_impl.py", "    for k0 in range(0, H, BLOCK_H):\n        ks = k0 + tl.arange(0, BLOCK_H)\n        kmask = ks < H\n        h = tl.load(", "    for k0 in range(0, H - BLOCK_H + 1, BLOCK_H):\n        ks = k0 + tl.arange(0, BLOCK_H)\n        kmask = ks < H\n        h = tl.load(",
  "tests/test_kernels.py::test_triton_kernels_under_interpreter[config_6]"),
 ("echo_subsets_ignored", "stage1_sft.py", "profile_echo(r, items, popt, k) if x < dropout + echo", "profile_echo(r, items, popt) if x < dropout + echo",
  "tests/test_llm_stages.py::test_echo_subsets_state_part_of_the_profile_without_the_label"),
 ("echo_from_target_ignored", "stage1_sft.py", 'for r in rows] if of == "target" else None', 'for r in rows] if of == "targets" else None',
  "tests/test_llm_stages.py::test_echo_from_target_states_only_genres_of_the_target"),
 ("cause_choice_split_unaligned", "common.py", "    if len(ex) != len(rows) or any(e.get(\"uid\")", "    if False and any(e.get(\"uid\")",
  "tests/test_evaluate.py::test_cause_choice_script_scores_a_split_from_the_run_folder_and_refuses_other_rows"),
]


def main():
    only = sys.argv[1:]
    unknown = sorted(set(only) - {f[0] for f in FAULTS})
    if unknown:
        sys.exit(f"check_tests_catch_faults.py: no fault named {', '.join(unknown)}")
    bad = 0
    for name, f, old, new, tests in FAULTS:
        if only and name not in only:
            continue
        s = open(f"{SRC}/{f}").read()
        if old not in s:  # the code moved on and the fault no longer applies: a failure, not a crash
            print(f"{name:28s} STALE: {f} no longer contains {old[:60]!r}", flush=True)
            bad += 1
            continue
        d = tempfile.mkdtemp(prefix=f"fault_{name}_")
        shutil.rmtree(d)
        shutil.copytree(SRC, d, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__"))
        open(f"{d}/{f}", "w").write(s.replace(old, new))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests.split()],
                           cwd=d, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=d))
        last = ([l for l in (r.stdout + r.stderr).splitlines() if l.strip()] or ["(no output)"])[-1]
        print(f"{name:28s} {'caught' if r.returncode else 'NOT CAUGHT'} | {last[:100]}", flush=True)
        bad += r.returncode == 0
        shutil.rmtree(d, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
