# mmpose 1.x config of DWPose as upstream MuseTalk runs it: RTMPose-L whole-body
# (133 keypoints, 288x384 input), with only what inference reads. It is an
# mmengine config file, loaded by path (musetalk_worker/faces/dwpose.py), not
# imported; the weights are dwpose/dw-ll_ucoco_384.pth.
default_scope = "mmpose"

input_size = (288, 384)  # (width, height) of the crop the network sees

# SimCC: one 1-D classification per axis, at twice the input resolution.
codec = dict(
    type="SimCCLabel",
    input_size=input_size,
    sigma=(6.0, 6.93),
    simcc_split_ratio=2.0,
    normalize=False,
    use_dark=False,
)

model = dict(
    type="TopdownPoseEstimator",
    data_preprocessor=dict(
        type="PoseDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
    ),
    backbone=dict(
        _scope_="mmdet",
        type="CSPNeXt",
        arch="P5",
        deepen_factor=1.0,
        widen_factor=1.0,
        expand_ratio=0.5,
        channel_attention=True,
        out_indices=(4,),
        # Trained with SyncBN (eps 1e-5); plain BN with the same eps infers the same.
        # CSPNeXt's own default (eps 1e-3) would not.
        norm_cfg=dict(type="BN", eps=1e-5),
        act_cfg=dict(type="SiLU"),
    ),
    head=dict(
        type="RTMCCHead",
        in_channels=1024,
        out_channels=133,
        input_size=input_size,
        in_featuremap_size=(9, 12),  # input_size / 32
        simcc_split_ratio=codec["simcc_split_ratio"],
        final_layer_kernel_size=7,
        gau_cfg=dict(
            hidden_dims=256,
            s=128,
            expansion_factor=2,
            dropout_rate=0.0,
            drop_path=0.0,
            act_fn="SiLU",
            use_rel_bias=False,
            pos_enc=False,
        ),
        decoder=codec,
    ),
    # Upstream averages the prediction with that of the mirrored crop.
    test_cfg=dict(flip_test=True),
)

# What mmpose's inference_topdown builds each sample with: the whole frame as
# the box (padded by 1.25), warped to the input size.
test_dataloader = dict(
    dataset=dict(
        pipeline=[
            dict(type="LoadImage"),
            dict(type="GetBBoxCenterScale"),
            dict(type="TopdownAffine", input_size=input_size),
            dict(type="PackPoseInputs"),
        ]
    )
)
