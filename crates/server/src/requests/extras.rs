//! A1111's "Extras" requests (upscaling, face restoration) and the device work they become.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{decode_image, BuildContext};
use crate::error::ApiError;
use crate::work::{ExtrasWork, UpscaleSpec, UpscaleTarget, Work};

/// Extras options shared by single and batch (A1111's `ExtrasBaseRequest`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct ExtrasParams {
    /// 0: scale by `upscaling_resize`; 1: to `upscaling_resize_w` × `upscaling_resize_h`.
    pub resize_mode: u32,
    pub show_extras_results: bool,
    pub gfpgan_visibility: f32,
    pub codeformer_visibility: f32,
    pub codeformer_weight: f32,
    pub upscaling_resize: f32,
    pub upscaling_resize_w: u32,
    pub upscaling_resize_h: u32,
    pub upscaling_crop: bool,
    pub upscaler_1: String,
    pub upscaler_2: String,
    pub extras_upscaler_2_visibility: f32,
    pub upscale_first: bool,
}

impl Default for ExtrasParams {
    fn default() -> Self {
        Self {
            resize_mode: 0,
            show_extras_results: true,
            gfpgan_visibility: 0.0,
            codeformer_visibility: 0.0,
            codeformer_weight: 0.0,
            upscaling_resize: 2.0,
            upscaling_resize_w: 512,
            upscaling_resize_h: 512,
            upscaling_crop: true,
            upscaler_1: "None".into(),
            upscaler_2: "None".into(),
            extras_upscaler_2_visibility: 0.0,
            upscale_first: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct ExtrasSingleRequest {
    #[serde(flatten)]
    pub params: ExtrasParams,
    /// Base64 image.
    pub image: String,
}

/// One image of `extra-batch-images`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct FileData {
    /// Base64 image (A1111 sends data URLs here).
    pub data: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct ExtrasBatchRequest {
    #[serde(flatten)]
    pub params: ExtrasParams,
    #[serde(rename = "imageList")]
    pub image_list: Vec<FileData>,
}

impl ExtrasSingleRequest {
    pub fn into_batch(self) -> ExtrasBatchRequest {
        ExtrasBatchRequest {
            params: self.params,
            image_list: vec![FileData {
                data: self.image,
                name: "image".into(),
            }],
        }
    }
}

/// The device work of an extras request: upscaling and/or face restoration on given images.
pub fn extras_work(
    ctx: &BuildContext<'_>,
    r: &ExtrasBatchRequest,
    save: bool,
) -> Result<Work, ApiError> {
    let p = &r.params;
    if r.image_list.is_empty() {
        return Err(ApiError::bad_request("no image given"));
    }
    if r.image_list.len() > 64 {
        return Err(ApiError::bad_request(format!(
            "at most 64 images per request, got {}",
            r.image_list.len()
        )));
    }
    let images = r
        .image_list
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Ok((
                f.name.clone(),
                decode_image(&format!("image {i}"), &f.data)?,
            ))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    if let Some(files) = &ctx.files {
        for u in [&p.upscaler_1, &p.upscaler_2] {
            files
                .post
                .check_upscaler(u)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
    }
    if !(0.0..=1.0).contains(&p.gfpgan_visibility) {
        return Err(ApiError::bad_request(format!(
            "gfpgan_visibility must be between 0 and 1, got {}",
            p.gfpgan_visibility
        )));
    }
    if let (true, Some(files)) = (p.gfpgan_visibility > 0.0, &ctx.files) {
        files
            .post
            .check_face_restorer()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let target = if p.resize_mode == 1 {
        if p.upscaling_resize_w == 0 || p.upscaling_resize_h == 0 {
            return Err(ApiError::bad_request(
                "upscaling_resize_w and upscaling_resize_h must be positive",
            ));
        }
        UpscaleTarget::Size {
            width: p.upscaling_resize_w,
            height: p.upscaling_resize_h,
            crop: p.upscaling_crop,
        }
    } else {
        if !(p.upscaling_resize > 0.0 && p.upscaling_resize <= 8.0) {
            return Err(ApiError::bad_request(format!(
                "upscaling_resize must be in (0, 8], got {}",
                p.upscaling_resize
            )));
        }
        UpscaleTarget::Factor(p.upscaling_resize)
    };
    let max = ctx.limits.max_size as f32 * 4.0;
    for (name, img) in &images {
        let f = match target {
            UpscaleTarget::Factor(f) => f,
            UpscaleTarget::Size { width, height, .. } => {
                (width as f32 / img.width() as f32).max(height as f32 / img.height() as f32)
            }
        };
        if img.width() as f32 * f > max || img.height() as f32 * f > max {
            return Err(ApiError::bad_request(format!(
                "{name}: the result would be larger than {max} pixels on a side"
            )));
        }
    }
    Ok(Work::Extras(ExtrasWork {
        images,
        upscale: UpscaleSpec {
            upscaler_1: p.upscaler_1.clone(),
            upscaler_2: p.upscaler_2.clone(),
            upscaler_2_visibility: p.extras_upscaler_2_visibility.clamp(0.0, 1.0),
            target,
        },
        gfpgan_visibility: p.gfpgan_visibility,
        upscale_first: p.upscale_first,
        save,
    }))
}
